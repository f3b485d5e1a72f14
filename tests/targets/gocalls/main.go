// Command gocalls is the micro target of the probe-overhead benchmark: it calls one small,
// non-inlined function in a tight loop and reports the mean wall time per call, so the cost
// a uprobe adds to every call can be read off by running it with and without probes.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"time"
)

// work is the probed function: a few arithmetic operations, never inlined, so every loop
// iteration is a real call through its entry (and its RET).
//
//go:noinline
func work(x int) int {
	return (x*31 + 7) ^ (x >> 3)
}

func main() {
	n := flag.Int("n", 1000000, "number of calls to work")
	wait := flag.Bool("wait", false, "print READY <pid> and wait for a line on stdin before starting")
	sleep := flag.Duration("sleep", 0, "sleep this long before the calls (churn tests: the agent attaches meanwhile)")
	flag.Parse()

	if *wait {
		fmt.Printf("READY %d\n", os.Getpid())
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			fmt.Fprintf(os.Stderr, "gocalls: waiting for start line: %v\n", err)
			os.Exit(1)
		}
	}

	time.Sleep(*sleep)
	acc := 0
	start := time.Now()
	for i := 0; i < *n; i++ {
		acc += work(i)
	}
	elapsed := time.Since(start)

	perCall := 0.0
	if *n > 0 {
		perCall = float64(elapsed.Nanoseconds()) / float64(*n)
	}
	fmt.Printf("NS_PER_CALL %.3f\n", perCall)
	// acc goes to stderr so the loop cannot be optimised away and stdout stays parseable.
	fmt.Fprintf(os.Stderr, "checksum %d\n", acc)
}
