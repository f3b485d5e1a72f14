// The demo's target: a small user service with the latency profile of a real one.
// GET /api/user/{id} sleeps 50-250 ms (a slow backend), /health answers at once.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

type userService struct{}

type user struct {
	ID   int    `json:"id"`
	Name string `json:"name"`
}

//go:noinline
func (s *userService) handleGetUser(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.Atoi(r.PathValue("id"))
	if err != nil || id <= 0 {
		http.Error(w, "bad user id", http.StatusBadRequest)
		return
	}
	time.Sleep(time.Duration(50+rand.Intn(200)) * time.Millisecond)
	if id%17 == 0 {
		http.Error(w, "user not found", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(user{ID: id, Name: fmt.Sprintf("user-%d", id)})
}

//go:noinline
func (s *userService) handleHealth(w http.ResponseWriter, r *http.Request) {
	w.Write([]byte("ok\n"))
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	flag.Parse()
	s := &userService{}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/user/{id}", s.handleGetUser)
	mux.HandleFunc("GET /health", s.handleHealth)
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("LISTEN", ln.Addr().String())
	os.Stdout.Sync()
	srv := &http.Server{Handler: mux}
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}()
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
