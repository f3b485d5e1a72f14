// Command goserver is the HTTP test target for ebpf-apm. Its handlers are non-inlined
// methods so their symbols exist in the binary and uprobes can be attached to them; each
// one exercises a behaviour the tracer must survive: slow requests, custom status codes,
// goroutine stack growth (the runtime moves the stack) and streamed, flushed responses.
//
// Standard library only; it must build with Go 1.19 and newer toolchains, so it uses no
// method/wildcard ServeMux patterns.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// server carries no state; handlers are methods so their symbol names have the shape
// main.(*server).handleX that Go method symbols have in real services.
type server struct {
	started time.Time
}

// queryInt returns the integer query parameter name, or def when it is absent or invalid.
func queryInt(r *http.Request, name string, def int) int {
	v := r.URL.Query().Get(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return def
	}
	return n
}

// sleepMs sleeps for ms milliseconds; non-positive values do not sleep.
func sleepMs(ms int) {
	if ms > 0 {
		time.Sleep(time.Duration(ms) * time.Millisecond)
	}
}

// handleSleep serves /sleep?ms=N&status=S: sleep N ms, answer status S (default 200).
//
//go:noinline
func (s *server) handleSleep(w http.ResponseWriter, r *http.Request) {
	ms := queryInt(r, "ms", 0)
	status := queryInt(r, "status", http.StatusOK)
	if status < 100 || status > 999 {
		http.Error(w, "bad status", http.StatusBadRequest)
		return
	}
	sleepMs(ms)
	w.WriteHeader(status)
	if _, err := w.Write([]byte("ok\n")); err != nil {
		return
	}
}

// grow recurses n levels with a large frame so the goroutine's stack has to grow (the
// runtime copies it to a new, larger allocation) while a request is in flight.
//
//go:noinline
func grow(n int) int {
	var buf [512]byte
	for i := range buf {
		buf[i] = byte(n + i)
	}
	if n <= 0 {
		return int(buf[n&511])
	}
	return grow(n-1) + int(buf[(n*7)&511])
}

// handleDeep serves /deep?depth=N&ms=M: recurse N levels through grow, sleep M ms.
//
//go:noinline
func (s *server) handleDeep(w http.ResponseWriter, r *http.Request) {
	depth := queryInt(r, "depth", 64)
	if depth < 0 || depth > 100000 {
		http.Error(w, "bad depth", http.StatusBadRequest)
		return
	}
	result := grow(depth)
	sleepMs(queryInt(r, "ms", 0))
	w.WriteHeader(http.StatusOK)
	fmt.Fprintf(w, "%d\n", result)
}

// handleChunks serves /chunks?sizes=100,2000,5&ms=M: write each chunk of 'x' bytes, flush
// after each and sleep M ms between chunks, so the response is streamed.
//
//go:noinline
func (s *server) handleChunks(w http.ResponseWriter, r *http.Request) {
	var sizes []int
	if raw := r.URL.Query().Get("sizes"); raw != "" {
		for _, part := range strings.Split(raw, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(part))
			if err != nil || n < 0 || n > 64<<20 {
				http.Error(w, "bad sizes", http.StatusBadRequest)
				return
			}
			sizes = append(sizes, n)
		}
	}
	ms := queryInt(r, "ms", 0)
	flusher, canFlush := w.(http.Flusher)
	w.WriteHeader(http.StatusOK)
	for i, n := range sizes {
		if i > 0 {
			sleepMs(ms)
		}
		if _, err := w.Write([]byte(strings.Repeat("x", n))); err != nil {
			return
		}
		if canFlush {
			flusher.Flush()
		}
	}
}

// handlePanic serves /panic: it never returns (net/http recovers the panic and closes the
// connection), so a probe on its RET never fires and its call stays in flight.
//
//go:noinline
func (s *server) handlePanic(w http.ResponseWriter, r *http.Request) {
	panic("requested panic")
}

// leafWork is the innermost named function of /fanout: it sleeps ms milliseconds (the
// goroutine may resume on another thread).
//
//go:noinline
func leafWork(ms int) int {
	sleepMs(ms)
	return ms + 1
}

// fanoutWorker runs on a goroutine of its own: it calls leafWork, then starts one more
// goroutine that calls leafWork too, and waits for it.
//
//go:noinline
func fanoutWorker(ms int) int {
	total := leafWork(ms)
	var inner sync.WaitGroup
	inner.Add(1)
	go func() {
		defer inner.Done()
		total += leafWork(ms)
	}()
	inner.Wait()
	return total
}

// handleFanout serves /fanout/ID?n=K&ms=M: K goroutines each run fanoutWorker(M), and the
// handler waits for all of them. The tree of one request is fixed by K: handleFanout, K
// fanoutWorker spans under it and two leafWork spans under each of those.
//
//go:noinline
func (s *server) handleFanout(w http.ResponseWriter, r *http.Request) {
	n := queryInt(r, "n", 1)
	if n < 0 || n > 64 {
		http.Error(w, "bad n", http.StatusBadRequest)
		return
	}
	ms := queryInt(r, "ms", 0)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fanoutWorker(ms)
		}()
	}
	wg.Wait()
	w.WriteHeader(http.StatusOK)
	fmt.Fprintf(w, "%d\n", n)
}

// handleHealth serves /health.
//
//go:noinline
func (s *server) handleHealth(w http.ResponseWriter, r *http.Request) {
	w.WriteHeader(http.StatusOK)
	if _, err := w.Write([]byte("ok")); err != nil {
		return
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address (port 0 picks a free port)")
	flag.Parse()

	s := &server{started: time.Now()}
	mux := http.NewServeMux()
	// The subtree forms let a test put a request id in the path (/sleep/17?ms=5), so each
	// span can be matched to the one request that caused it.
	mux.HandleFunc("/sleep", s.handleSleep)
	mux.HandleFunc("/sleep/", s.handleSleep)
	mux.HandleFunc("/deep", s.handleDeep)
	mux.HandleFunc("/deep/", s.handleDeep)
	mux.HandleFunc("/chunks", s.handleChunks)
	mux.HandleFunc("/chunks/", s.handleChunks)
	mux.HandleFunc("/fanout/", s.handleFanout)
	mux.HandleFunc("/health", s.handleHealth)
	mux.HandleFunc("/panic", s.handlePanic)

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "goserver: listen on %s: %v\n", *addr, err)
		os.Exit(1)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	// Tell the test harness the real port; exactly one line, flushed before serving.
	out := bufio.NewWriter(os.Stdout)
	fmt.Fprintf(out, "LISTEN %s\n", ln.Addr().String())
	if err := out.Flush(); err != nil {
		os.Exit(1)
	}

	done := make(chan struct{})
	go func() {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		<-sigs
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			fmt.Fprintf(os.Stderr, "goserver: shutdown: %v\n", err)
		}
		close(done)
	}()

	if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
		fmt.Fprintf(os.Stderr, "goserver: serve: %v\n", err)
		os.Exit(1)
	}
	<-done
}
