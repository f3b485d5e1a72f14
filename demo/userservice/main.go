// The demo's target: a small user service with the latency profile of a real one.
// GET /api/user/{id} reads the user from PostgreSQL (database/sql, lib/pq) and, at the same
// time on another goroutine, asks the profile service over gRPC; it counts the visit in a
// transaction and then formats the answer (a slow step, 20-120 ms). /health answers at once.
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	_ "github.com/lib/pq"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
)

// rawCodec sends []byte messages as they are (no protobuf).
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "raw" }

type userService struct {
	db       *sql.DB
	profiles *grpc.ClientConn
}

type user struct {
	ID      int             `json:"id"`
	Name    string          `json:"name"`
	Profile json.RawMessage `json:"profile,omitempty"`
}

func (s *userService) profile(ctx context.Context, id int) ([]byte, error) {
	in, out := []byte(strconv.Itoa(id)), []byte(nil)
	err := s.profiles.Invoke(ctx, "/demo.Profiles/Get", &in, &out, grpc.CallContentSubtype("raw"))
	return out, err
}

func (s *userService) countVisit(ctx context.Context, id int) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, "UPDATE users SET visits = visits + 1 WHERE id = $1", id); err != nil {
		return err
	}
	return tx.Commit()
}

//go:noinline
func formatUser(u *user) []byte {
	time.Sleep(time.Duration(20+rand.Intn(100)) * time.Millisecond) // the slow step
	b, _ := json.Marshal(u)
	return b
}

//go:noinline
func (s *userService) handleGetUser(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/api/user/"))
	if r.Method != http.MethodGet || err != nil || id <= 0 {
		http.Error(w, "bad user id", http.StatusBadRequest)
		return
	}
	ctx := r.Context()
	type answer struct {
		body []byte
		err  error
	}
	profile := make(chan answer, 1)
	go func() {
		body, err := s.profile(ctx, id)
		profile <- answer{body, err}
	}()
	u := user{ID: id}
	err = s.db.QueryRowContext(ctx, "SELECT name FROM users WHERE id = $1", id).Scan(&u.Name)
	p := <-profile
	switch {
	case errors.Is(err, sql.ErrNoRows):
		http.Error(w, "user not found", http.StatusNotFound)
		return
	case err != nil:
		http.Error(w, "database: "+err.Error(), http.StatusInternalServerError)
		return
	}
	if p.err == nil {
		u.Profile = p.body
	} else if st, _ := status.FromError(p.err); st.Code().String() != "NotFound" {
		http.Error(w, "profiles: "+p.err.Error(), http.StatusBadGateway)
		return
	}
	if err := s.countVisit(ctx, id); err != nil {
		http.Error(w, "database: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(formatUser(&u))
}

//go:noinline
func (s *userService) handleHealth(w http.ResponseWriter, r *http.Request) {
	w.Write([]byte("ok\n"))
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	profilesAddr := flag.String("profiles", "", "the profile service's gRPC address")
	dbURL := flag.String("db", "", "PostgreSQL URL of the users table")
	flag.Parse()
	encoding.RegisterCodec(rawCodec{})
	db, err := sql.Open("postgres", *dbURL)
	if err != nil {
		log.Fatal(err)
	}
	db.SetMaxOpenConns(8)
	conn, err := grpc.Dial(*profilesAddr, grpc.WithInsecure())
	if err != nil {
		log.Fatal(err)
	}
	s := &userService{db: db, profiles: conn}
	mux := http.NewServeMux()
	// Patterns without methods or wildcards: the GOPATH-mode build has no go.mod, so the
	// mux keeps Go 1.21's pattern syntax.
	mux.HandleFunc("/api/user/", s.handleGetUser)
	mux.HandleFunc("/health", s.handleHealth)
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
