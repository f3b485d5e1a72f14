"""Compiles the agent's BPF probe families with BCC and attaches them to target processes.

The only module of the agent that imports `bcc`. It knows nothing about Kafka or batching:
it turns probe plans into attached uprobes plus the per-process map entries the BPF side
looks up, and hands out readers of the event rings.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ebpf_apm import bpf as bpf_sources
from ebpf_apm.producer.bpf_run_stats import RunStats, RunTimeStats, program_run_stats
from ebpf_apm.producer.errors import KernelSupportError, PrivilegeError, TargetError
from ebpf_apm.producer.event_layout import (
    CLIENT_SPAN_EVENT,
    HTTP_SPAN_EVENT,
    NET_EVENT,
    SPAN_EVENT,
)
from ebpf_apm.producer.map_layout import (
    COUNTERS,
    PROBE_HITS,
    PROCESS_LAYOUT,
    SITE_ENTRY,
    SITE_FLAG_HTTP,
    SITE_FLAG_HTTP_FINISH,
    SITE_RETURN,
)
from ebpf_apm.producer.ringbuf_reader import RingBufReader

log = logging.getLogger(__name__)

BPF_DIR = bpf_sources.source_dir()
# Probe families, compiled as one BPF object so they share the per-process table and the
# counters. BCC only turns functions of its main source into programs, so the files are
# joined into one text rather than #included.
SPAN_SOURCE = BPF_DIR / "uprobe_spans.bpf.c"
NET_SOURCE = BPF_DIR / "net_events.bpf.c"
TRACEFS_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

NET_HOOKS = ("auto", "kprobes", "tracepoints", "off")


@dataclass(frozen=True)
class ProbeOptions:
    """Compile-time options of the span program (passed as -D defines)."""

    span_ring_pages: int = 1024
    http_ring_pages: int = 256
    client_ring_pages: int = 256  # outgoing calls (HTTP, gRPC, SQL clients)
    net_ring_pages: int = 1024
    net_hooks: str = "auto"  # NET_HOOKS; "auto" picks kprobes when the kernel has them
    wakeup_every: int = 256
    max_calls_in_flight: int = 65536
    use_perf_buffer: bool = False
    synthetic_burst: int = 0  # benchmarks: span records per getppid() of the synthetic pid

    def cflags(self) -> list[str]:
        flags = [
            f"-I{BPF_DIR}",
            f"-DSPAN_RING_PAGES={self.span_ring_pages}",
            f"-DHTTP_RING_PAGES={self.http_ring_pages}",
            f"-DCLIENT_RING_PAGES={self.client_ring_pages}",
            f"-DNET_RING_PAGES={self.net_ring_pages}",
            f"-DWAKEUP_EVERY={self.wakeup_every}",
            f"-DMAX_CALLS_IN_FLIGHT={self.max_calls_in_flight}",
        ]
        if self.use_perf_buffer:
            flags.append("-DUSE_PERF_BUFFER")
        if self.net_hooks in ("kprobes", "tracepoints"):
            flags.append("-DWITH_NET_EVENTS")
        if self.net_hooks == "kprobes":
            flags.append("-DNET_KPROBES")
        if self.synthetic_burst:
            flags += ["-DSYNTHETIC_SOURCE", f"-DSYNTHETIC_BURST={self.synthetic_burst}"]
        return flags


@dataclass(frozen=True)
class ProcessLayout:
    """Field offsets the BPF side needs for one process (-1 where unknown)."""

    is_go: bool
    goid: int = -1
    request_method: int = -1
    request_url: int = -1
    url_path: int = -1
    response_status: int = -1
    http_finish: bool = False  # net/http.(*response).finishRequest is probed too
    h2_server: bool = False  # an HTTP/2 runHandler is probed: it makes HTTP/2 spans
    request_header: int = -1  # net/http.Request.Header: HTTP/1 spans continue a traceparent
    header_map: int = 0  # HEADER_MAP_*: how that map is laid out (0: not read)


@dataclass
class _AttachedProcess:
    sites: list[int] = field(default_factory=list)  # runtime addresses in probe_sites
    # BCC's event name of each uprobe. Detaching by (path, address) makes BCC resolve
    # /proc/PID/exe again, which fails once the process has exited: the probe would leak.
    uprobe_events: set[bytes] = field(default_factory=set)


class PerfBufferReader:
    """The pre-5.8 fallback: BCC's perf buffer, one Python callback per record."""

    def __init__(self, bpf: Any, table: str, record: np.dtype[Any], pages: int) -> None:
        self.record = record
        self._chunks: list[bytes] = []
        self._bpf = bpf

        def on_record(_cpu: int, data: int, size: int) -> None:
            self._chunks.append(ctypes.string_at(data, record.itemsize))

        def on_lost(_count: int) -> None:
            """The program counts these itself (a failed perf_submit is `ring_full`); without
            a callback BCC would print every loss to stdout."""

        bpf[table.encode()].open_perf_buffer(on_record, page_cnt=pages, lost_cb=on_lost)

    def drain(self, max_records: int | None = None) -> np.ndarray:
        self._bpf.perf_buffer_poll(timeout=0)
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.empty(0, dtype=self.record)
        return np.frombuffer(b"".join(chunks), dtype=self.record)

    def close(self) -> None:
        pass


Reader = RingBufReader | PerfBufferReader


class AgentProbes:
    """The agent's BPF object (span and network probe families) loaded into the kernel,
    and the probes attached for it."""

    def __init__(self, options: ProbeOptions | None = None) -> None:
        options = options or ProbeOptions()
        self.options = replace(options, net_hooks=choose_net_hooks(options.net_hooks))
        require_privileges()
        try:
            from bcc import BPF  # noqa: PLC0415 - bcc is imported here and nowhere else
        except ImportError as exc:
            raise KernelSupportError(
                f"cannot import BCC ({exc}); run `make setup` (Debian package python3-bpfcc)"
            ) from exc
        if not self.options.use_perf_buffer and not _kernel_has_ringbuf():
            raise KernelSupportError(
                "this kernel has no BPF ring buffer (needs Linux 5.8); "
                "run the agent with --event-transport perf"
            )
        try:
            self._bpf = BPF(text=self.program_text().encode(), cflags=self.options.cflags())
        except Exception as exc:  # BCC raises bare Exception for compile and load failures
            raise KernelSupportError(
                f"could not compile or load the BPF probes: {exc}. Check that kernel "
                "headers are installed and linked (`make setup`) and tracefs is mounted"
            ) from exc
        # On for as long as the probes are loaded: the probe CPU estimate needs each
        # program's run time (producer/probe_cost.py).
        self.run_time_stats = RunTimeStats().open()
        self._processes: dict[int, _AttachedProcess] = {}
        self._calibration_events: set[bytes] = set()
        self._sites = self._bpf[b"probe_sites"]
        self._layouts = self._bpf[b"process_layouts"]
        self.span_reader: Reader
        self.http_reader: Reader
        self.client_reader: Reader
        self.net_reader: Reader | None = None
        if self.options.use_perf_buffer:
            self.span_reader = PerfBufferReader(self._bpf, "span_events", SPAN_EVENT, 256)
            self.http_reader = PerfBufferReader(self._bpf, "http_events", HTTP_SPAN_EVENT, 64)
            self.client_reader = PerfBufferReader(self._bpf, "client_events", CLIENT_SPAN_EVENT, 64)
            if self.net_enabled:
                self.net_reader = PerfBufferReader(self._bpf, "net_events", NET_EVENT, 256)
        else:
            self.span_reader = RingBufReader(
                self._bpf[b"span_events"].map_fd, self.options.span_ring_pages, SPAN_EVENT
            )
            self.http_reader = RingBufReader(
                self._bpf[b"http_events"].map_fd, self.options.http_ring_pages, HTTP_SPAN_EVENT
            )
            self.client_reader = RingBufReader(
                self._bpf[b"client_events"].map_fd,
                self.options.client_ring_pages,
                CLIENT_SPAN_EVENT,
            )
            if self.net_enabled:
                self.net_reader = RingBufReader(
                    self._bpf[b"net_events"].map_fd, self.options.net_ring_pages, NET_EVENT
                )

    def program_text(self) -> str:
        sources = [SPAN_SOURCE] + ([NET_SOURCE] if self.net_enabled else [])
        return "\n".join(source.read_text() for source in sources)

    @property
    def wakeup_fds(self) -> list[int]:
        """File descriptors that turn readable when the kernel forces a reader wakeup."""
        if self.options.use_perf_buffer:
            return []
        rings = [b"span_events", b"http_events", b"client_events"]
        rings += [b"net_events"] if self.net_enabled else []
        return [self._bpf[ring].map_fd for ring in rings]

    @property
    def net_enabled(self) -> bool:
        return self.options.net_hooks != "off"

    def add_process(self, pid: int, layout: ProcessLayout) -> None:
        value = np.zeros(1, dtype=PROCESS_LAYOUT)
        for name in PROCESS_LAYOUT.names or ():
            value[name] = getattr(layout, name)
        self._layouts[ctypes.c_uint32(pid)] = self._layouts.Leaf.from_buffer_copy(value.tobytes())
        self._processes.setdefault(pid, _AttachedProcess())

    def attach_function(
        self,
        pid: int,
        binary: str,
        load_bias: int,
        address: int,
        entry_offset: int,
        return_offsets: list[int],
        func_id: int,
        http: bool,
        is_go: bool,
        http_finish: bool = False,
        server_flags: int = 0,
        fields: tuple[int, int, int, int] = (-1, -1, -1, -1),
        entry_only: bool = False,
        returns_only: bool = False,
    ) -> None:
        """Attach one function: `address` is its ELF address, `load_bias` what the process
        added to ELF addresses when it mapped the binary (0 unless PIE). `http_finish`:
        only its returns, which end the HTTP span of `func_id` (finishRequest).
        `server_flags` (SITE_FLAG_H2, _GRPC, _GRPC_STATUS) and the field offsets it
        reads make it an HTTP/2 or gRPC server probe; `entry_only`: no return probes
        (WriteStatus only adds the status to the call `func_id`); `returns_only`: no entry
        probe (runtime.newproc1 with the offsets to find its caller at the return)."""
        proc = self._processes[pid]
        flags = (SITE_FLAG_HTTP if http else 0) | server_flags
        if http_finish:
            flags |= SITE_FLAG_HTTP_FINISH
        path = binary.encode()
        known = set(self._bpf.uprobe_fds)
        try:
            if not (http_finish or returns_only):
                self._add_site(
                    proc, pid, load_bias + address + entry_offset, func_id, SITE_ENTRY, flags,
                    fields,
                )
                self._bpf.attach_uprobe(
                    name=path, addr=address + entry_offset, fn_name=b"span_entry", pid=pid
                )
            if entry_only:
                pass
            elif is_go:
                for offset in return_offsets:
                    self._add_site(
                        proc, pid, load_bias + address + offset, func_id, SITE_RETURN, flags,
                        fields,
                    )
                    self._bpf.attach_uprobe(
                        name=path, addr=address + offset, fn_name=b"span_return", pid=pid
                    )
            else:
                self._bpf.attach_uretprobe(
                    name=path, addr=address, fn_name=b"span_uretprobe", pid=pid
                )
        except Exception as exc:
            if not os.path.exists(f"/proc/{pid}"):
                raise TargetError(f"process {pid} exited while probes were attached") from exc
            raise KernelSupportError(
                f"attaching uprobes to {binary} (pid {pid}) at {address:#x} failed: {exc}"
            ) from exc
        finally:
            proc.uprobe_events |= set(self._bpf.uprobe_fds) - known

    def _add_site(
        self,
        proc: _AttachedProcess,
        pid: int,
        ip: int,
        func_id: int,
        role: int,
        flags: int,
        fields: tuple[int, int, int, int] = (-1, -1, -1, -1),
    ) -> None:
        leaf = self._sites.Leaf(func_id, role, flags, *fields)
        self._sites[self._sites.Key(pid, 0, ip)] = leaf
        proc.sites.append(ip)

    def detach_process(self, pid: int) -> None:
        """Remove a process's probes and map entries (it exited, or is no longer wanted)."""
        proc = self._processes.pop(pid, None)
        if proc is None:
            return
        for event in proc.uprobe_events:
            try:
                self._bpf.detach_uprobe_event(event)
            except Exception as exc:  # BCC raises bare Exception
                log.debug("detaching %s for pid %d: %s", event.decode(), pid, exc)
        for ip in proc.sites:
            self._sites.pop(self._sites.Key(pid, 0, ip), None)
        self._layouts.pop(ctypes.c_uint32(pid), None)
        self._bpf[b"probe_hits"].pop(ctypes.c_uint32(pid), None)
        self._forget_calls(pid)

    def _forget_calls(self, pid: int) -> None:
        for table in ("calls_in_flight", "thread_stacks", "goroutine_contexts", "spawning"):
            stale = [key for key in self._bpf[table.encode()] if key.tgid == pid]
            for key in stale:
                self._bpf[table.encode()].pop(key, None)

    def sweep_abandoned_calls(self, older_than_ns: int) -> int:
        """Forget calls that entered longer ago than `older_than_ns` and never returned.

        A Go function that panics (and is recovered further up) or calls runtime.Goexit
        leaves through no RET, so its entry would stay in the table forever: goroutine ids
        are never reused. Returns how many were removed."""
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        table = self._bpf[b"calls_in_flight"]
        stale = [key for key, start in table.items() if now - start.start_ns > older_than_ns]
        for key in stale:
            table.pop(key, None)
        return len(stale)

    def counters(self) -> dict[str, int]:
        # Perf buffers too: a full buffer fails perf_submit, which the program counts itself.
        table = self._bpf[b"counters"]
        return {name: int(table.sum(slot).value) for name, slot in COUNTERS.items()}

    def probe_hits(self) -> dict[int, np.ndarray]:
        """Per traced process, how often each program ran for it (a PROBE_HITS record,
        summed over CPUs)."""
        table = self._bpf[b"probe_hits"]
        hits = {}
        for key in list(table.keys()):
            try:
                per_cpu = table.getvalue(key)
            except KeyError:  # the process was detached meanwhile
                continue
            values = np.frombuffer(bytes(per_cpu), dtype=PROBE_HITS)
            total = np.zeros(1, dtype=PROBE_HITS)
            for name in PROBE_HITS.names or ():
                total[name] = values[name].sum()
            hits[int(key.value)] = total[0]
        return hits

    def program_run_stats(self) -> dict[str, RunStats]:
        """Run time and count of every loaded program, by its name in the BPF source."""
        return {
            name.decode(): program_run_stats(function.fd)
            for name, function in list(self._bpf.funcs.items())
        }

    def attach_trap_calibration(self, binary: str, symbol: str, pid: int) -> None:
        """The empty `trap_calibration` program on `symbol` of `binary`, in `pid` only."""
        known = set(self._bpf.uprobe_fds)
        try:
            self._bpf.attach_uprobe(
                name=binary.encode(), sym=symbol.encode(), fn_name=b"trap_calibration", pid=pid
            )
        except Exception as exc:  # BCC raises bare Exception
            raise KernelSupportError(
                f"attaching the calibration uprobe to {symbol} in {binary} failed: {exc}"
            ) from exc
        finally:
            self._calibration_events |= set(self._bpf.uprobe_fds) - known

    def detach_trap_calibration(self) -> None:
        for event in self._calibration_events:
            try:
                self._bpf.detach_uprobe_event(event)
            except Exception as exc:  # BCC raises bare Exception
                log.debug("detaching calibration probe %s: %s", event.decode(), exc)
        self._calibration_events.clear()

    @property
    def attached_uprobes(self) -> int:
        """Uprobes currently attached, all processes (a leak shows here)."""
        return len(self._bpf.uprobe_fds)

    def set_synthetic_pid(self, pid: int) -> None:
        table = self._bpf[b"synthetic_pid"]
        table[ctypes.c_int(0)] = ctypes.c_uint32(pid)

    def close(self) -> None:
        for pid in list(self._processes):
            self.detach_process(pid)
        for reader in (self.span_reader, self.http_reader, self.net_reader):
            if reader is not None:
                reader.close()
        self.detach_trap_calibration()
        self._bpf.cleanup()
        self.run_time_stats.close()


# CAP_SYS_ADMIN(21), CAP_PERFMON(38), CAP_BPF(39)
_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39


def require_privileges() -> None:
    """Fail early, before any target is touched, when BPF cannot be loaded at all."""
    effective = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                effective = int(line.split()[1], 16)
    has = lambda cap: bool(effective >> cap & 1)  # noqa: E731
    if not (has(_CAP_SYS_ADMIN) or (has(_CAP_BPF) and has(_CAP_PERFMON))):
        raise PrivilegeError(
            "loading BPF programs and uprobes needs root, or the capabilities CAP_BPF, "
            "CAP_PERFMON, CAP_SYS_PTRACE and CAP_SYS_RESOURCE; run the agent as root "
            "(sudo ebpf-apm agent ...) or grant those capabilities"
        )


def choose_net_hooks(wanted: str) -> str:
    """Which hooks report socket I/O: kprobes on tcp_sendmsg/tcp_recvmsg where the kernel has
    kprobes, else the sock:sock_{send,recv}_length tracepoints (Linux 6.3+)."""
    if wanted not in NET_HOOKS:
        raise KernelSupportError(f"network hooks {wanted!r}: choose one of {', '.join(NET_HOOKS)}")
    has_kprobes = any((root / "kprobe_events").exists() for root in TRACEFS_ROOTS)
    has_tracepoints = any(
        (root / "events/sock/sock_send_length").exists() for root in TRACEFS_ROOTS
    )
    if wanted == "auto":
        if has_kprobes:
            return "kprobes"
        if has_tracepoints:
            return "tracepoints"
        log.warning(
            "this kernel has neither kprobes nor the sock:sock_send_length tracepoint "
            "(Linux 6.3+): network events are off"
        )
        return "off"
    if wanted == "kprobes" and not has_kprobes:
        raise KernelSupportError("--net-hooks kprobes: this kernel has no kprobes; use auto")
    if wanted == "tracepoints" and not has_tracepoints:
        raise KernelSupportError(
            "--net-hooks tracepoints: sock:sock_send_length needs Linux 6.3; use auto"
        )
    return wanted


def _kernel_has_ringbuf() -> bool:
    release = os.uname().release.split("-")[0].split(".")
    try:
        major, minor = int(release[0]), int(release[1])
    except (ValueError, IndexError):
        return True
    return (major, minor) >= (5, 8)
