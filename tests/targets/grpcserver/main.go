// Command grpcserver is the gRPC and HTTP/2 test target for ebpf-apm, and its own client.
//
// Server mode serves, until SIGTERM:
//   - gRPC (google.golang.org/grpc) on -grpc: service apm.test.Echo with a unary method
//     Unary and a server-streaming method Stream. A request is the text "ms,code[,n]": the
//     handler sleeps ms milliseconds (Stream: sends n messages first) and returns gRPC
//     status code `code`. No protobuf: a codec passes the bytes through.
//   - HTTP/2 over TLS (net/http's bundled h2 server) on -h2tls, with a self-signed
//     certificate made at start.
//   - HTTP/2 without TLS (golang.org/x/net/http2's server through h2c) on -h2c.
//   The HTTP handlers serve /sleep?ms=N&status=S.
//
// Client mode (-client grpc|h2tls|h2c) makes -calls calls from -workers goroutines and
// prints one JSON line per call: what was asked, what came back, and the client's own
// start and end times (CLOCK_REALTIME ns), the ground truth tests compare spans with.
//
// Builds in GOPATH mode against Debian's golang-google-grpc-dev and golang-golang-x-net-dev
// sources (/usr/share/gocode), with Go 1.19 and newer.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// rawCodec sends []byte messages as they are: the test needs no protobuf.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string   { return "raw" }
func (rawCodec) String() string { return "raw" }

// parseAsk reads "ms,code[,n]".
func parseAsk(b []byte) (ms int, code int, n int) {
	parts := strings.Split(string(b), ",")
	ms, _ = strconv.Atoi(parts[0])
	if len(parts) > 1 {
		code, _ = strconv.Atoi(parts[1])
	}
	if len(parts) > 2 {
		n, _ = strconv.Atoi(parts[2])
	}
	return
}

func answer(code int) error {
	if code == 0 {
		return nil
	}
	return status.Error(codes.Code(code), "asked for it")
}

//go:noinline
func unaryHandler(srv interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	ms, code, _ := parseAsk(in)
	time.Sleep(time.Duration(ms) * time.Millisecond)
	out := []byte("ok")
	return &out, answer(code)
}

//go:noinline
func streamHandler(srv interface{}, stream grpc.ServerStream) error {
	var in []byte
	if err := stream.RecvMsg(&in); err != nil {
		return err
	}
	ms, code, n := parseAsk(in)
	for i := 0; i < n; i++ {
		out := []byte("part")
		if err := stream.SendMsg(&out); err != nil {
			return err
		}
	}
	time.Sleep(time.Duration(ms) * time.Millisecond)
	return answer(code)
}

var echoService = grpc.ServiceDesc{
	ServiceName: "apm.test.Echo",
	HandlerType: (*interface{})(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Unary", Handler: unaryHandler}},
	Streams: []grpc.StreamDesc{
		{StreamName: "Stream", Handler: streamHandler, ServerStreams: true},
	},
}

// handleSleep serves /sleep?ms=N&status=S.
func handleSleep(w http.ResponseWriter, r *http.Request) {
	ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
	code, err := strconv.Atoi(r.URL.Query().Get("status"))
	if err != nil {
		code = http.StatusOK
	}
	time.Sleep(time.Duration(ms) * time.Millisecond)
	w.WriteHeader(code)
	fmt.Fprintf(w, "%s %s\n", r.Proto, r.URL.Path)
}

func selfSigned() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	tmpl := x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err != nil {
		panic(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func listen(addr string) net.Listener {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	return ln
}

func serve(grpcAddr, tlsAddr, h2cAddr string) {
	gs := grpc.NewServer(grpc.CustomCodec(rawCodec{}))
	gs.RegisterService(&echoService, nil)
	g := listen(grpcAddr)
	go gs.Serve(g)

	mux := http.NewServeMux()
	mux.HandleFunc("/", handleSleep)
	t := listen(tlsAddr)
	tlsServer := &http.Server{Handler: mux, TLSConfig: &tls.Config{
		Certificates: []tls.Certificate{selfSigned()}, NextProtos: []string{"h2", "http/1.1"},
	}}
	go tlsServer.ServeTLS(t, "", "")
	c := listen(h2cAddr)
	h2cServer := &http.Server{Handler: h2c.NewHandler(mux, &http2.Server{})}
	go h2cServer.Serve(c)

	// Ready: the ports (useful when the addresses end in :0).
	fmt.Printf("{\"grpc\":%q,\"h2tls\":%q,\"h2c\":%q}\n", g.Addr(), t.Addr(), c.Addr())
	os.Stdout.Sync()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	gs.Stop()
}

type result struct {
	Kind    string `json:"kind"`
	Ask     string `json:"ask"`
	Code    int    `json:"code"`
	StartNs int64  `json:"start_ns"`
	EndNs   int64  `json:"end_ns"`
	Err     string `json:"err,omitempty"`
}

func main() {
	grpcAddr := flag.String("grpc", "127.0.0.1:0", "gRPC listen (server) or dial (client) address")
	tlsAddr := flag.String("h2tls", "127.0.0.1:0", "HTTP/2 over TLS address")
	h2cAddr := flag.String("h2c", "127.0.0.1:0", "HTTP/2 cleartext (x/net/http2) address")
	client := flag.String("client", "", "client mode: unary, stream, h2tls or h2c")
	asks := flag.String("asks", "5,0", "client: ';'-separated asks, used in turn (grpc \"ms,code[,n]\"; http \"path?query\")")
	calls := flag.Int("calls", 16, "client: number of calls")
	workers := flag.Int("workers", 16, "client: concurrent goroutines")
	flag.Parse()
	if *client == "" {
		serve(*grpcAddr, *tlsAddr, *h2cAddr)
		return
	}
	list := strings.Split(*asks, ";")
	var do func(ask string) (int, error)
	switch *client {
	case "unary", "stream":
		conn, err := grpc.Dial(*grpcAddr, grpc.WithInsecure(), grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
		if err != nil {
			panic(err)
		}
		do = func(ask string) (int, error) {
			in := []byte(ask)
			var err error
			if *client == "unary" {
				var out []byte
				err = conn.Invoke(context.Background(), "/apm.test.Echo/Unary", &in, &out)
			} else {
				var s grpc.ClientStream
				s, err = conn.NewStream(context.Background(), &echoService.Streams[0], "/apm.test.Echo/Stream")
				if err == nil {
					if err = s.SendMsg(&in); err == nil {
						err = s.CloseSend()
					}
					for err == nil {
						var out []byte
						err = s.RecvMsg(&out)
					}
					if err == io.EOF {
						err = nil
					}
				}
			}
			return int(status.Code(err)), nil
		}
	case "h2tls", "h2c":
		var tr http.RoundTripper
		base := "https://" + *tlsAddr
		if *client == "h2tls" {
			tr = &http2.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
		} else {
			base = "http://" + *h2cAddr
			tr = &http2.Transport{AllowHTTP: true, DialTLS: func(network, addr string, _ *tls.Config) (net.Conn, error) {
				return net.Dial(network, addr)
			}}
		}
		hc := &http.Client{Transport: tr}
		do = func(ask string) (int, error) {
			// "path?query#TRACEPARENT": the request carries that traceparent header.
			target, traceparent, _ := strings.Cut(ask, "#")
			req, err := http.NewRequest("GET", base+target, nil)
			if err != nil {
				return 0, err
			}
			if traceparent != "" {
				req.Header.Set("traceparent", traceparent)
			}
			resp, err := hc.Do(req)
			if err != nil {
				return 0, err
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.ProtoMajor != 2 {
				return 0, fmt.Errorf("answered over %s, not HTTP/2", resp.Proto)
			}
			return resp.StatusCode, nil
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown -client", *client)
		os.Exit(2)
	}
	jobs := make(chan int)
	var mu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	var wg sync.WaitGroup
	for w := 0; w < *workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				ask := list[i%len(list)]
				start := time.Now().UnixNano()
				code, err := do(ask)
				r := result{Kind: *client, Ask: ask, Code: code, StartNs: start, EndNs: time.Now().UnixNano()}
				if err != nil {
					r.Err = err.Error()
				}
				mu.Lock()
				enc.Encode(r)
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < *calls; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
}
