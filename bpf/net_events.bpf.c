/* Socket sends and receives of traced processes, with the goroutine that made them.
 *
 * Compiled after uprobe_spans.bpf.c into one BPF object: it filters on the same per-process
 * table (`process_layouts`: only traced processes produce events) and counts into the same
 * counters. Two hook sets, chosen by the agent at run time:
 *   NET_KPROBES   kprobes/kretprobes on tcp_sendmsg and tcp_recvmsg (kernels with kprobes)
 *   otherwise     the stable tracepoints sock:sock_send_length / sock:sock_recv_length
 *                 (Linux 6.3+), which report the call's result for every socket family
 *
 * The goroutine: the syscall runs on whatever thread the goroutine is on, and the g pointer
 * is in R14 of the user registers saved at syscall entry (Go's register ABI), so the record
 * reads R14 from the task's saved registers, then the goroutine id from g.
 */
#include <net/sock.h>

#ifndef NET_RING_PAGES
#define NET_RING_PAGES 1024
#endif
#define RING_NET 2
#define MSG_PEEK_FLAG 2

#ifdef USE_PERF_BUFFER
BPF_PERF_OUTPUT(net_events);
#else
BPF_RINGBUF_OUTPUT(net_events, NET_RING_PAGES);
#endif

static __always_inline s64 syscall_goid(struct process_layout *layout)
{
    if (!layout->is_go)
        return -1;
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
    u64 g = 0;
    s64 goid = -1;
    if (bpf_probe_read_kernel(&g, sizeof(g), &regs->r14) != 0 || g == 0)
        return -1;
    if (bpf_probe_read_user(&goid, sizeof(goid), (void *)(g + layout->goid)) != 0) {
        count(COUNTER_READ_FAILED);
        return -1;
    }
    return goid;
}

static __always_inline void fill_addresses(struct net_event *e, struct sock *sk, u16 family)
{
    e->family = (u8)family;
    __builtin_memset(e->saddr, 0, sizeof(e->saddr));
    __builtin_memset(e->daddr, 0, sizeof(e->daddr));
    u16 dport = 0;
    bpf_probe_read_kernel(&e->sport, sizeof(e->sport), &sk->__sk_common.skc_num);
    bpf_probe_read_kernel(&dport, sizeof(dport), &sk->__sk_common.skc_dport);
    e->dport = ntohs(dport);
    if (family == AF_INET) {
        bpf_probe_read_kernel(e->saddr, 4, &sk->__sk_common.skc_rcv_saddr);
        bpf_probe_read_kernel(e->daddr, 4, &sk->__sk_common.skc_daddr);
    } else if (family == AF_INET6) {
        bpf_probe_read_kernel(e->saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
        bpf_probe_read_kernel(e->daddr, 16, &sk->__sk_common.skc_v6_daddr);
    }
}

static __always_inline void emit_net(void *ctx, struct sock *sk, u16 family, s64 bytes,
                                     u8 direction)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    struct process_layout *layout = process_layouts.lookup(&tgid);
    if (!layout)
        return;
#ifndef NET_KPROBES
    struct probe_hits *hits = hits_of(tgid); /* kprobes count where they fire */
    if (hits)
        hits->net += 1;
#endif
    if (bytes <= 0)
        return;
    if (family != AF_INET && family != AF_INET6)
        return; /* unix sockets, netlink...: not network I/O */
#ifdef USE_PERF_BUFFER
    struct net_event stack_event = {};
    struct net_event *e = &stack_event;
#else
    struct net_event *e = net_events.ringbuf_reserve(sizeof(struct net_event));
    if (!e) {
        count(COUNTER_NET_RING_FULL);
        return;
    }
#endif
    e->hdr.kind = EVENT_KIND_NET;
    e->hdr.size = sizeof(*e);
    e->hdr.pid = tgid;
    e->hdr.ts_ns = bpf_ktime_get_boot_ns();
    e->goid = syscall_goid(layout);
    e->bytes = bytes;
    e->tid = (u32)pid_tgid;
    e->direction = direction;
    __builtin_memset(e->_pad, 0, sizeof(e->_pad));
    fill_addresses(e, sk, family);
#ifdef USE_PERF_BUFFER
    if (net_events.perf_submit(ctx, e, sizeof(*e)) != 0)
        count(COUNTER_NET_RING_FULL);
    else
        count(COUNTER_NET_EMITTED);
#else
    net_events.ringbuf_submit(e, wakeup_flag(RING_NET));
    count(COUNTER_NET_EMITTED);
#endif
}

#ifdef NET_KPROBES
/* The socket of each thread's call in flight, from entry to return. */
BPF_HASH(net_calls, u64, struct sock *, 16384);

int kprobe__tcp_sendmsg(struct pt_regs *ctx, struct sock *sk)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (process_layouts.lookup(&tgid)) {
        struct probe_hits *hits = hits_of(tgid);
        if (hits)
            hits->net += 1;
        net_calls.update(&pid_tgid, &sk);
    }
    return 0;
}

int kprobe__tcp_recvmsg(struct pt_regs *ctx, struct sock *sk)
{
    return kprobe__tcp_sendmsg(ctx, sk);
}

static __always_inline int net_return(struct pt_regs *ctx, u8 direction)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    struct sock **skp = net_calls.lookup(&pid_tgid);
    if (!skp)
        return 0;
    u32 tgid = pid_tgid >> 32;
    struct probe_hits *hits = probe_hits.lookup(&tgid); /* counted at entry: never created here */
    if (hits)
        hits->net += 1;
    struct sock *sk = *skp;
    net_calls.delete(&pid_tgid);
    u16 family = 0;
    bpf_probe_read_kernel(&family, sizeof(family), &sk->__sk_common.skc_family);
    emit_net(ctx, sk, family, (s64)(int)PT_REGS_RC(ctx), direction);
    return 0;
}

int kretprobe__tcp_sendmsg(struct pt_regs *ctx)
{
    return net_return(ctx, NET_SEND);
}

int kretprobe__tcp_recvmsg(struct pt_regs *ctx)
{
    return net_return(ctx, NET_RECV);
}
#else
TRACEPOINT_PROBE(sock, sock_send_length)
{
    emit_net(args, (struct sock *)args->sk, args->family, args->ret, NET_SEND);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length)
{
    if (args->flags & MSG_PEEK_FLAG)
        return 0; /* a peek leaves the bytes for the read that follows */
    emit_net(args, (struct sock *)args->sk, args->family, args->ret, NET_RECV);
    return 0;
}
#endif
