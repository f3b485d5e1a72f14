// Command fanout is the span-tree target for client calls: an HTTP handler that fans out
// to HTTP, gRPC and SQL calls on goroutines it starts (and one goroutine of a goroutine).
//
// It serves, until SIGTERM, HTTP/1 on one port and gRPC (service apm.test.Fan, unary Get,
// no protobuf: a codec passes the bytes through) on another, and prints their addresses as
// one JSON line. GET /fanout/N starts three goroutines: an HTTP GET of its own /leaf/N, a
// gRPC call of its own Fan/Get, and a SQL query whose literals carry "secret-N"; the query's
// goroutine starts a fourth that runs a statement with another such literal. The handler
// waits for all four and answers 200. GET /leaf/N answers at once.
//
// Builds in GOPATH mode against Debian's grpc and lib/pq sources, with Go 1.19 and newer.
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"

	_ "github.com/lib/pq"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "raw" }

func get(_ interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	out := append([]byte("got "), in...)
	return &out, nil
}

var fan = grpc.ServiceDesc{
	ServiceName: "apm.test.Fan",
	HandlerType: (*interface{})(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Get", Handler: get}},
}

type server struct {
	self string // this program's HTTP address
	conn *grpc.ClientConn
	db   *sql.DB
}

func (s *server) fanout(w http.ResponseWriter, r *http.Request) {
	n := strings.TrimPrefix(r.URL.Path, "/fanout/")
	var wg sync.WaitGroup
	failures := make(chan string, 4)
	wg.Add(3)
	go func() {
		defer wg.Done()
		resp, err := http.Get("http://" + s.self + "/leaf/" + n)
		if err != nil {
			failures <- err.Error()
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}()
	go func() {
		defer wg.Done()
		in, out := []byte(n), []byte(nil)
		if err := s.conn.Invoke(r.Context(), "/apm.test.Fan/Get", &in, &out, grpc.CallContentSubtype("raw")); err != nil {
			failures <- err.Error()
		}
	}()
	go func() {
		defer wg.Done()
		var inner sync.WaitGroup
		inner.Add(1)
		go func() { // a goroutine of a goroutine
			defer inner.Done()
			if _, err := s.db.ExecContext(r.Context(), "SELECT 'nested-secret-"+n+"', 4711"); err != nil {
				failures <- err.Error()
			}
		}()
		var count int
		q := "SELECT count(*) FROM pg_class WHERE relname = 'secret-" + n + "' AND relpages > 98765"
		if err := s.db.QueryRowContext(r.Context(), q).Scan(&count); err != nil {
			failures <- err.Error()
		}
		inner.Wait()
	}()
	wg.Wait()
	close(failures)
	for f := range failures {
		http.Error(w, f, http.StatusInternalServerError)
		return
	}
	w.Write([]byte("ok\n"))
}

func main() {
	pg := flag.String("pg", "", "PostgreSQL URL")
	flag.Parse()
	encoding.RegisterCodec(rawCodec{})
	httpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	grpcLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	grpcServer := grpc.NewServer()
	grpcServer.RegisterService(&fan, nil)
	go grpcServer.Serve(grpcLn)
	conn, err := grpc.Dial(grpcLn.Addr().String(), grpc.WithInsecure())
	if err != nil {
		log.Fatal(err)
	}
	db, err := sql.Open("postgres", *pg)
	if err != nil {
		log.Fatal(err)
	}
	db.SetMaxOpenConns(32)
	s := &server{self: httpLn.Addr().String(), conn: conn, db: db}
	mux := http.NewServeMux()
	mux.HandleFunc("/fanout/", s.fanout)
	mux.HandleFunc("/leaf/", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("leaf\n")) })
	addrs, _ := json.Marshal(map[string]string{"http": httpLn.Addr().String(), "grpc": grpcLn.Addr().String()})
	fmt.Println(string(addrs))
	os.Stdout.Sync()
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
		grpcServer.Stop()
		httpLn.Close()
	}()
	http.Serve(httpLn, mux)
}
