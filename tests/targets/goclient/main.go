// Command goclient is the client-span test target for ebpf-apm: a Go program that makes
// outgoing HTTP, gRPC and database/sql calls, and (in -serve mode) the servers it calls.
//
// -serve: an HTTP/1 server (/status/S/N?ms=M answers status S after M ms) and a gRPC
// server (apm.test.Echo/Unary: the request "ms,code" sleeps ms and returns status code
// `code`) on 127.0.0.1, their addresses printed as one JSON line; runs until SIGTERM.
//
// Client mode: for each line on stdin (the test attaches the agent first), one round: -calls
// calls from -workers goroutines, each call making one HTTP request, one unary gRPC call,
// one server-streaming gRPC call and four SQL statements (the line "http", "grpc",
// "grpc_stream" or "sql": only that kind; any other line: all of them, then one request
// that fails in the transport). It prints one JSON line per call: its kind, what it asked,
// what came back, the caller's own start and end (CLOCK_REALTIME ns) and the local and
// remote address of the connection it used where the library tells it; then
// {"kind":"round"}. It exits at the end of stdin. SQL statements carry literals (never
// placeholders) so the test can check that none leaves the node.
//
// Builds in GOPATH mode against Debian's golang-google-grpc-dev and golang-github-lib-pq-dev
// sources (/usr/share/gocode), with Go 1.19 and newer.
package main

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	_ "github.com/lib/pq"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string   { return "raw" }
func (rawCodec) String() string { return "raw" }

func unaryHandler(srv interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	parts := strings.Split(string(in), ",")
	ms, _ := strconv.Atoi(parts[0])
	code, _ := strconv.Atoi(parts[1])
	time.Sleep(time.Duration(ms) * time.Millisecond)
	out := []byte("ok")
	if code == 0 {
		return &out, nil
	}
	return nil, status.Error(codes.Code(code), "asked for it")
}

// streamHandler reads "ms,code,n", sends n messages, sleeps ms and returns status `code`.
func streamHandler(srv interface{}, stream grpc.ServerStream) error {
	var in []byte
	if err := stream.RecvMsg(&in); err != nil {
		return err
	}
	parts := strings.Split(string(in), ",")
	ms, _ := strconv.Atoi(parts[0])
	code, _ := strconv.Atoi(parts[1])
	n, _ := strconv.Atoi(parts[2])
	for i := 0; i < n; i++ {
		out := []byte("part")
		if err := stream.SendMsg(&out); err != nil {
			return err
		}
	}
	time.Sleep(time.Duration(ms) * time.Millisecond)
	if code == 0 {
		return nil
	}
	return status.Error(codes.Code(code), "asked for it")
}

var echoService = grpc.ServiceDesc{
	ServiceName: "apm.test.Echo",
	HandlerType: (*interface{})(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Unary", Handler: unaryHandler}},
	Streams: []grpc.StreamDesc{
		{StreamName: "Stream", Handler: streamHandler, ServerStreams: true},
	},
}

func serve() {
	httpLn, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	grpcLn, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	mux := http.NewServeMux()
	mux.HandleFunc("/status/", func(w http.ResponseWriter, r *http.Request) {
		parts := strings.Split(r.URL.Path, "/")
		code, _ := strconv.Atoi(parts[2])
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		time.Sleep(time.Duration(ms) * time.Millisecond)
		w.WriteHeader(code)
	})
	go http.Serve(httpLn, mux)
	gs := grpc.NewServer(grpc.CustomCodec(rawCodec{}))
	gs.RegisterService(&echoService, nil)
	go gs.Serve(grpcLn)
	addrs, _ := json.Marshal(map[string]string{"http": httpLn.Addr().String(), "grpc": grpcLn.Addr().String()})
	fmt.Println(string(addrs))
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	gs.Stop()
}

type call struct {
	Kind    string `json:"kind"` // http, http_error, grpc, sql
	Method  string `json:"method,omitempty"`
	Host    string `json:"host,omitempty"`
	Path    string `json:"path,omitempty"`
	Status  int    `json:"status"`
	Op      string `json:"op,omitempty"`
	Sent    string `json:"sent,omitempty"` // the SQL text as sent
	StartNs int64  `json:"start_ns"`
	EndNs   int64  `json:"end_ns"`
	Err     string `json:"err,omitempty"`
	Local   string `json:"local,omitempty"`
	Remote  string `json:"remote,omitempty"`
}

var httpStatuses = []int{200, 201, 404, 503}

func main() {
	serveMode := flag.Bool("serve", false, "serve HTTP and gRPC")
	httpAddr := flag.String("http", "", "HTTP server address")
	grpcAddr := flag.String("grpc", "", "gRPC server address")
	dsn := flag.String("pg", "", "PostgreSQL URL")
	calls := flag.Int("calls", 16, "calls of each kind")
	workers := flag.Int("workers", 16, "concurrent callers")
	flag.Parse()
	if *serveMode {
		serve()
		return
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: *workers}}
	conn, err := grpc.Dial(*grpcAddr, grpc.WithInsecure(), grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
	must(err)
	db, err := sql.Open("postgres", *dsn)
	must(err)
	db.SetMaxOpenConns(*workers)
	_, err = db.Exec("CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, name text)")
	must(err)
	var mu sync.Mutex
	out := json.NewEncoder(os.Stdout)
	emit := func(c call) {
		mu.Lock()
		defer mu.Unlock()
		out.Encode(c)
	}
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		kind := strings.TrimSpace(lines.Text())
		all := kind != "http" && kind != "grpc" && kind != "grpc_stream" && kind != "sql"
		jobs := make(chan int)
		var wg sync.WaitGroup
		for w := 0; w < *workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range jobs {
					if all || kind == "http" {
						doHTTP(client, *httpAddr, i, emit)
					}
					if all || kind == "grpc" {
						doGRPC(conn, i, emit)
					}
					if all || kind == "grpc_stream" {
						doGRPCStream(conn, i, emit)
					}
					if all || kind == "sql" {
						doSQL(db, i, emit)
					}
				}
			}()
		}
		for i := 0; i < *calls; i++ {
			jobs <- i
		}
		close(jobs)
		wg.Wait()
		if all {
			// One transport error: nothing listens on port 1.
			c := call{Kind: "http_error", Method: "GET", Host: "127.0.0.1:1", Path: "/refused"}
			c.StartNs = time.Now().UnixNano()
			_, err := client.Get("http://127.0.0.1:1/refused?q=1")
			c.EndNs = time.Now().UnixNano()
			if err != nil {
				c.Err = err.Error()
			}
			emit(c)
		}
		emit(call{Kind: "round"})
	}
}

func doHTTP(client *http.Client, addr string, i int, emit func(call)) {
	st := httpStatuses[i%len(httpStatuses)]
	path := fmt.Sprintf("/status/%d/%d", st, i)
	c := call{Kind: "http", Method: "GET", Host: addr, Path: path}
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		c.Local = info.Conn.LocalAddr().String()
		c.Remote = info.Conn.RemoteAddr().String()
	}}
	req, _ := http.NewRequest("GET", "http://"+addr+path+"?ms=2&token=QUERYSECRET", nil)
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
	c.StartNs = time.Now().UnixNano()
	resp, err := client.Do(req)
	c.EndNs = time.Now().UnixNano()
	if err != nil {
		c.Err = err.Error()
	} else {
		c.Status = resp.StatusCode
		resp.Body.Close()
	}
	emit(c)
}

func doGRPC(conn *grpc.ClientConn, i int, emit func(call)) {
	code := i % 17
	in := []byte(fmt.Sprintf("2,%d", code))
	var reply []byte
	var p peer.Peer
	c := call{Kind: "grpc", Method: "/apm.test.Echo/Unary"}
	c.StartNs = time.Now().UnixNano()
	err := conn.Invoke(context.Background(), c.Method, &in, &reply, grpc.Peer(&p))
	c.EndNs = time.Now().UnixNano()
	c.Status = int(status.Code(err))
	if p.Addr != nil {
		c.Remote = p.Addr.String()
	}
	emit(c)
}

var streamDesc = &grpc.StreamDesc{StreamName: "Stream", ServerStreams: true}

func doGRPCStream(conn *grpc.ClientConn, i int, emit func(call)) {
	code := (i + 3) % 17
	in := []byte(fmt.Sprintf("2,%d,3", code))
	c := call{Kind: "grpc_stream", Method: "/apm.test.Echo/Stream"}
	c.StartNs = time.Now().UnixNano()
	stream, err := conn.NewStream(context.Background(), streamDesc, c.Method)
	if err == nil {
		err = stream.SendMsg(&in)
	}
	if err == nil {
		err = stream.CloseSend()
	}
	for err == nil {
		var part []byte
		err = stream.RecvMsg(&part)
	}
	c.EndNs = time.Now().UnixNano()
	if err != io.EOF {
		c.Status = int(status.Code(err))
	}
	emit(c)
}

func doSQL(db *sql.DB, i int, emit func(call)) {
	id := 424200000 + i
	run := func(op string, text string, f func() error) {
		c := call{Kind: "sql", Op: op, Sent: text}
		c.StartNs = time.Now().UnixNano()
		err := f()
		c.EndNs = time.Now().UnixNano()
		if err != nil {
			c.Err = err.Error()
		}
		emit(c)
	}
	insert := fmt.Sprintf("INSERT INTO items (id, name) VALUES (%d, 'SECRET-%d') ON CONFLICT (id) DO UPDATE SET name = E'it\\'s SECRET-%d'", id, i, i)
	run("INSERT", insert, func() error { _, err := db.Exec(insert); return err })
	query := fmt.Sprintf("SELECT name FROM items WHERE id = %d AND name <> $$SECRET-%d$$", id, i)
	run("SELECT", query, func() error {
		var name string
		if err := db.QueryRow(query).Scan(&name); err != sql.ErrNoRows {
			return err // (no row is not an error of the statement)
		}
		return nil
	})
	// A statement in a transaction, and one that fails.
	update := fmt.Sprintf("UPDATE items SET name = 'SECRET-%d' /* SECRET-%d */ WHERE id = %d", i, i, id)
	tx, err := db.Begin()
	must(err)
	run("UPDATE", update, func() error { _, err := tx.Exec(update); return err })
	must(tx.Commit())
	bad := fmt.Sprintf("SELECT * FROM no_such_table WHERE id = %d", id)
	run("SELECT", bad, func() error {
		rows, err := db.Query(bad)
		if err == nil {
			rows.Close()
		}
		return err
	})
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
