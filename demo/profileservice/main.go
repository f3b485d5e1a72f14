// The demo's second service: user profiles over gRPC (google.golang.org/grpc).
// demo.Profiles/Get takes a user id as text, looks it up for 5-30 ms and answers the profile,
// or NOT_FOUND for ids divisible by 13. No protobuf: a codec passes the bytes through.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"math/rand"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
)

// rawCodec sends []byte messages as they are.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "raw" }

//go:noinline
func getProfile(_ interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	id, err := strconv.Atoi(string(in))
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, "user id is not a number")
	}
	time.Sleep(time.Duration(5+rand.Intn(25)) * time.Millisecond)
	if id%13 == 0 {
		return nil, status.Error(codes.NotFound, "no profile")
	}
	out := []byte(fmt.Sprintf(`{"id":%d,"bio":"profile of user %d"}`, id, id))
	return &out, nil
}

var profiles = grpc.ServiceDesc{
	ServiceName: "demo.Profiles",
	HandlerType: (*interface{})(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "Get", Handler: getProfile}},
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	flag.Parse()
	encoding.RegisterCodec(rawCodec{})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer()
	srv.RegisterService(&profiles, nil)
	fmt.Println("LISTEN", ln.Addr().String())
	os.Stdout.Sync()
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
		srv.GracefulStop()
	}()
	if err := srv.Serve(ln); err != nil {
		log.Fatal(err)
	}
}
