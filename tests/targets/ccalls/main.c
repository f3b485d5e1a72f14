/*
 * ccalls: the C (non-Go) target. The agent must fall back to plain entry uprobes and
 * uretprobes for it; compute() sleeps so each call has a measurable, known latency.
 *
 * usage: ccalls CALLS [SLEEP_US]   (defaults: 10 calls, 1000 us)
 * Prints "READY <pid>", waits for one line on stdin (time to attach probes), makes the
 * calls, prints "DONE" and exits.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Sleeps us microseconds, then returns a value derived from us so the call has a result. */
__attribute__((noinline)) int compute(int us)
{
    usleep((useconds_t)us);
    return us * 2 + 1;
}

int main(int argc, char **argv)
{
    long calls = argc > 1 ? strtol(argv[1], NULL, 10) : 10;
    int sleep_us = argc > 2 ? (int)strtol(argv[2], NULL, 10) : 1000;
    char line[256];
    long sum = 0;

    if (calls < 0 || sleep_us < 0) {
        fprintf(stderr, "ccalls: CALLS and SLEEP_US must be >= 0\n");
        return 2;
    }
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    if (fgets(line, sizeof line, stdin) == NULL) {
        fprintf(stderr, "ccalls: stdin closed before the start line\n");
        return 1;
    }
    for (long i = 0; i < calls; i++)
        sum += compute(sleep_us);
    printf("DONE\n");
    fflush(stdout);
    return sum == -1; /* keeps the calls observable; never true */
}
