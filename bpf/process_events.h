/* Process lifecycle records: the agent learns of every exec and every process exit.
 *
 * Declared once, here; producer/process_discovery.py mirrors it and
 * tests/test_kernel_layout.py compiles this header to check the mirror. The record
 * starts with the common event header of events.h. Kinds 16 and up, so they can never be
 * mistaken for span or network records.
 */
#ifndef EBPF_APM_PROCESS_EVENTS_H
#define EBPF_APM_PROCESS_EVENTS_H

#include "events.h"

#define EVENT_KIND_PROCESS_EXEC 16
#define EVENT_KIND_PROCESS_EXIT 17

/* Slots of the per-CPU `process_counters` array; the agent names them by these numbers. */
#define PROCESS_COUNTER_RING_FULL 0
#define PROCESS_COUNTER_EMITTED 1
#define PROCESS_COUNTER_SLOTS 2

struct process_event {
    struct event_header hdr; /* hdr.pid: the process (tgid), in the initial PID namespace */
    __u32 tid;               /* exec: the thread that called exec; exit: the last thread */
    __u32 _pad;
    char comm[16];           /* the task's comm at the event */
};

#endif
