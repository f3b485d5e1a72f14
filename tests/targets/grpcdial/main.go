// Command grpcdial is a gRPC client and nothing else (no gRPC server linked): the agent must
// still find the structs its client probes read. It calls -addr once and exits.
package main

import (
	"context"
	"flag"
	"fmt"
	"time"

	"google.golang.org/grpc"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:1", "gRPC server")
	flag.Parse()
	conn, err := grpc.Dial(*addr, grpc.WithInsecure())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var out []byte
	fmt.Println(conn.Invoke(ctx, "/apm.test.Echo/Unary", &out, &out))
}
