/* Every exec and every process exit, for process discovery (producer/process_discovery.py).
 *
 * sched:sched_process_exec fires once the new program is in place; sched:sched_process_exit
 * fires for every exiting thread, and only the process's end is reported: where the kernel
 * has the tracepoint's `group_dead` field (Linux 6.16+) the loader defines HAVE_GROUP_DEAD and
 * the last thread of the group reports it; before that the thread-group leader does
 * (pid == tgid), which is the same except for a leader that exits before its threads.
 *
 * No maps keyed by process: nothing here can leak however many processes come and go.
 *
 * Options (-D from the loader):
 *   PROCESS_RING_PAGES   ring buffer size in pages (a power of two)
 *   WAKEUP_EVERY         records per CPU between forced wakeups; the reader polls on a timer
 *   HAVE_GROUP_DEAD      sched_process_exit has a group_dead field
 */
#include "process_events.h"

#ifndef PROCESS_RING_PAGES
#define PROCESS_RING_PAGES 64
#endif
#ifndef WAKEUP_EVERY
#define WAKEUP_EVERY 32
#endif

BPF_RINGBUF_OUTPUT(process_events, PROCESS_RING_PAGES);
BPF_PERCPU_ARRAY(process_counters, u64, PROCESS_COUNTER_SLOTS);
BPF_PERCPU_ARRAY(process_unwoken, u64, 1);

static __always_inline void count(u32 slot)
{
    u64 *value = process_counters.lookup(&slot);
    if (value)
        *value += 1;
}

static __always_inline u64 wakeup_flag(void)
{
    u32 zero = 0;
    u64 *pending = process_unwoken.lookup(&zero);
    if (!pending)
        return 0;
    *pending += 1;
    if (*pending < WAKEUP_EVERY)
        return BPF_RB_NO_WAKEUP;
    *pending = 0;
    return BPF_RB_FORCE_WAKEUP;
}

static __always_inline int emit(u16 kind, u32 tgid, u32 tid)
{
    struct process_event *e = process_events.ringbuf_reserve(sizeof(struct process_event));
    if (!e) {
        count(PROCESS_COUNTER_RING_FULL);
        return 0;
    }
    e->hdr.kind = kind;
    e->hdr.size = sizeof(struct process_event);
    e->hdr.pid = tgid;
    e->hdr.ts_ns = bpf_ktime_get_boot_ns();
    e->tid = tid;
    e->_pad = 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    process_events.ringbuf_submit(e, wakeup_flag());
    count(PROCESS_COUNTER_EMITTED);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u64 id = bpf_get_current_pid_tgid();
    return emit(EVENT_KIND_PROCESS_EXEC, id >> 32, args->old_pid);
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
#ifdef HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    if ((u32)id != (u32)(id >> 32))
        return 0;
#endif
    return emit(EVENT_KIND_PROCESS_EXIT, id >> 32, (u32)id);
}
