"""Loads the agent's BPF probe families and attaches them to target processes.

    ProbeOptions -> bpf_compiler (BCC, in a helper process) -> programs + maps as fds
      -> network tracepoints attached ; per process: uprobes (perf events, bpf_fds) and the
         map entries the BPF side looks up ; readers of the event rings (mapped by fd)

It knows nothing about Kafka or batching. It does not import `bcc`: the compile helper
does, in its own process, unless the perf-buffer transport or the old in-process loader is
chosen (ProbeOptions.loader).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import struct
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ebpf_apm import bpf as bpf_sources
from ebpf_apm.producer.bpf_compiler import (
    UPROBE_MULTI_SUFFIX,
    CompileHelper,
    attach_named_programs,
    compile_in_process,
)
from ebpf_apm.producer.bpf_fds import LinkCloser, attach_uprobe, attach_uprobe_multi
from ebpf_apm.producer.bpf_run_stats import RunStats, RunTimeStats, program_run_stats
from ebpf_apm.producer.elf_symbols import SymbolTable
from ebpf_apm.producer.errors import AgentError, KernelSupportError, PrivilegeError, TargetError
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
    SITE,
    SITE_ENTRY,
    SITE_FLAG_HTTP,
    SITE_FLAG_HTTP_FINISH,
    SITE_KEY,
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
# "helper": BCC compiles in a short-lived process (the agent never maps LLVM);
# "in-process": the old design, BCC and LLVM stay in the agent (benchmarks compare).
LOADERS = ("helper", "in-process")
# Per-process state the programs keep, keyed by tgid first: forgotten when a process exits.
CALL_MAPS = ("calls_in_flight", "thread_stacks", "goroutine_contexts", "spawning")
CLOSE_THREADS = 8  # uprobe_multi link closes at once (they share grace periods)
_LINKS_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, 524)  # 524: the kernel's ENOTSUPP
SPAN_MAPS = ("probe_sites", "process_layouts", *CALL_MAPS, "counters", "probe_hits")
#: Maps with entries of each traced process: all empty for a process once it is detached.
PER_PROCESS_MAPS = ("probe_sites", "process_layouts", "probe_hits", *CALL_MAPS)


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
    loader: str = "helper"  # LOADERS; the perf-buffer transport always loads in-process

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
    pid: int
    sites: list[int] = field(default_factory=list)  # runtime addresses in probe_sites
    # uprobe_multi links or perf events: closing one detaches its probes
    links: list[int] = field(default_factory=list)


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
_PID = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class AgentProbes:
    """The agent's BPF object (span and network probe families) loaded into the kernel,
    and the probes attached for it.

    Compiled in a helper process (options.loader "helper"): this process receives the
    programs and maps as descriptors and never maps BCC or LLVM. The perf-buffer transport
    compiles in this process, because its reader is BCC's."""

    def __init__(
        self, options: ProbeOptions | None = None, compiling: CompileHelper | None = None
    ) -> None:
        """`compiling`: the helper `start_compiling(options)` started, to collect from."""
        self.options = _checked(options or ProbeOptions())
        rings = _rings(self.options)
        try:
            if compiling is None:
                compiling = start_compiling(self.options)
            if compiling is None:
                self._obj = compile_in_process(*_object_spec(self.options))
            else:
                self._obj = compiling.result()
        except BaseException:
            if compiling is not None:
                compiling.cancel()
            raise
        try:
            attach_named_programs(self._obj)  # the network tracepoints (or kprobes)
        except (OSError, KernelSupportError) as exc:
            self._obj.close()
            raise KernelSupportError(f"attaching the network probes failed: {exc}") from exc
        # On for as long as the probes are loaded: the probe CPU estimate needs each
        # program's run time (producer/probe_cost.py).
        self.run_time_stats = RunTimeStats().open()
        self._processes: dict[int, _AttachedProcess] = {}
        self._calibration_links: list[int] = []
        # uprobe_multi links where the kernel loaded the programs for them (Linux 6.6+):
        # one descriptor per function and kind, released in parallel; else perf events.
        self.uprobe_links = "span_entry" + UPROBE_MULTI_SUFFIX in self._obj.programs
        self._closer = LinkCloser(CLOSE_THREADS if self.uprobe_links else 1)
        self._maps = self._obj.maps
        self._ring_fds = [self._maps[ring].fd for ring in rings]
        self.span_reader: Reader
        self.http_reader: Reader
        self.client_reader: Reader
        self.net_reader: Reader | None = None
        if self.options.use_perf_buffer:
            self._bpf = self._obj.bcc  # benchmarks/agent_throughput.py reads its perf buffers
            self.span_reader = PerfBufferReader(self._bpf, "span_events", SPAN_EVENT, 256)
            self.http_reader = PerfBufferReader(self._bpf, "http_events", HTTP_SPAN_EVENT, 64)
            self.client_reader = PerfBufferReader(self._bpf, "client_events", CLIENT_SPAN_EVENT, 64)
            if self.net_enabled:
                self.net_reader = PerfBufferReader(self._bpf, "net_events", NET_EVENT, 256)
        else:
            self.span_reader = RingBufReader(
                self._maps["span_events"].fd, self.options.span_ring_pages, SPAN_EVENT
            )
            self.http_reader = RingBufReader(
                self._maps["http_events"].fd, self.options.http_ring_pages, HTTP_SPAN_EVENT
            )
            self.client_reader = RingBufReader(
                self._maps["client_events"].fd,
                self.options.client_ring_pages,
                CLIENT_SPAN_EVENT,
            )
            if self.net_enabled:
                self.net_reader = RingBufReader(
                    self._maps["net_events"].fd, self.options.net_ring_pages, NET_EVENT
                )

    def program_text(self) -> str:
        return "\n".join(source.read_text() for source in _object_spec(self.options)[0])

    @property
    def wakeup_fds(self) -> list[int]:
        """File descriptors that turn readable when the kernel forces a reader wakeup."""
        return [] if self.options.use_perf_buffer else list(self._ring_fds)

    @property
    def net_enabled(self) -> bool:
        return self.options.net_hooks != "off"

    def attaching(self) -> contextlib.AbstractContextManager[None]:
        """Hold back pending probe detaches while a process's probes are attached: each
        detach holds the kernel's perf event mutex for a grace period (bpf_fds.LinkCloser)."""
        return self._closer.attaching()

    @property
    def pending_detaches(self) -> int:
        """Probes detached from their process but not yet closed in the kernel."""
        return self._closer.pending

    def add_process(self, pid: int, layout: ProcessLayout) -> None:
        value = np.zeros(1, dtype=PROCESS_LAYOUT)
        for name in PROCESS_LAYOUT.names or ():
            value[name] = getattr(layout, name)
        self._maps["process_layouts"].update(_PID.pack(pid), value.tobytes())
        self._processes.setdefault(pid, _AttachedProcess(pid))

    def attach_function(
        self,
        pid: int,
        binary: str,
        load_bias: int,
        address: int,
        file_offset: int,
        entry_offset: int,
        return_offsets: list[int],
        func_id: int,
        http: bool,
        is_go: bool,
        http_finish: bool = False,
        server_flags: int = 0,
        fields: tuple[int, int, int, int, int] = (-1, -1, -1, -1, -1),
        entry_only: bool = False,
        returns_only: bool = False,
    ) -> None:
        """Attach one function: `address` is its ELF address, `file_offset` where its first
        byte is in `binary`, `load_bias` what the process added to ELF addresses when it
        mapped the binary (0 unless PIE). `http_finish`: only its returns, which end the
        HTTP span of `func_id` (finishRequest). `server_flags` (SITE_FLAG_H2, _GRPC,
        _GRPC_STATUS, _CLIENT_*, _SPAWN) and the field offsets it reads make it a server,
        client or goroutine-creation probe; `entry_only`: no return probes (WriteStatus only
        adds the status to the call `func_id`); `returns_only`: no entry probe
        (runtime.newproc1 with the offsets to find its caller at the return)."""
        proc = self._processes[pid]
        flags = (SITE_FLAG_HTTP if http else 0) | server_flags
        if http_finish:
            flags |= SITE_FLAG_HTTP_FINISH
        try:
            if not (http_finish or returns_only):
                self._add_site(
                    proc,
                    pid,
                    load_bias + address + entry_offset,
                    func_id,
                    SITE_ENTRY,
                    flags,
                    fields,
                )
                self._attach_uprobes(proc, "span_entry", binary, [file_offset + entry_offset])
            if entry_only:
                pass
            elif is_go:
                for offset in return_offsets:
                    self._add_site(
                        proc,
                        pid,
                        load_bias + address + offset,
                        func_id,
                        SITE_RETURN,
                        flags,
                        fields,
                    )
                returns = [file_offset + offset for offset in return_offsets]
                self._attach_uprobes(proc, "span_return", binary, returns)
            else:
                self._attach_uprobes(proc, "span_uretprobe", binary, [file_offset], ret=True)
        except (OSError, KernelSupportError) as exc:
            if not os.path.exists(f"/proc/{pid}"):
                raise TargetError(f"process {pid} exited while probes were attached") from exc
            raise KernelSupportError(
                f"attaching uprobes to {binary} (pid {pid}) at {address:#x} failed: {exc}"
            ) from exc

    def _attach_uprobes(
        self,
        proc: _AttachedProcess,
        program: str,
        binary: str,
        offsets: list[int],
        ret: bool = False,
    ) -> None:
        """`program` at `offsets` of `binary` in `proc`'s process: one uprobe_multi link for
        all of them, else a perf event each; every descriptor goes into `proc.links` as soon
        as it is open, so a failure half-way leaves nothing unaccounted."""
        if not offsets:
            return
        pid = proc.pid
        if self.uprobe_links:
            multi = self._obj.programs[program + UPROBE_MULTI_SUFFIX]
            try:
                proc.links.append(attach_uprobe_multi(multi, binary, offsets, pid, ret))
                return
            except OSError as exc:
                if exc.errno not in _LINKS_UNSUPPORTED:
                    raise
                refused = exc
        else:
            refused = None
        for offset in offsets:
            proc.links.append(attach_uprobe(self._obj.programs[program], binary, offset, pid, ret))
        if refused is not None:
            # Perf events work where the link did not: the kernel loads programs for links
            # but refuses to create them. Perf events from now on, for every process.
            log.warning("uprobe_multi links refused (%s): attaching perf events", refused)
            self.uprobe_links = False
            self._closer.workers = 1

    def _add_site(
        self,
        proc: _AttachedProcess,
        pid: int,
        ip: int,
        func_id: int,
        role: int,
        flags: int,
        fields: tuple[int, int, int, int, int] = (-1, -1, -1, -1, -1),
    ) -> None:
        key = np.zeros(1, dtype=SITE_KEY)
        key["tgid"], key["ip"] = pid, ip
        site = np.zeros(1, dtype=SITE)
        site["func_id"], site["role"], site["flags"] = func_id, role, flags
        for name, value in zip(
            ("field_a", "field_b", "field_c", "field_d", "field_e"), fields, strict=True
        ):
            site[name] = value
        self._maps["probe_sites"].update(key.tobytes(), site.tobytes())
        proc.sites.append(ip)

    def detach_process(self, pid: int) -> None:
        """Remove a process's probes and map entries (it exited, or is no longer wanted)."""
        proc = self._processes.pop(pid, None)
        if proc is None:
            return
        self._closer.close(proc.links)
        key = np.zeros(1, dtype=SITE_KEY)
        key["tgid"] = pid
        for ip in proc.sites:
            key["ip"] = ip
            self._maps["probe_sites"].delete(key.tobytes())
        self._maps["process_layouts"].delete(_PID.pack(pid))
        self._maps["probe_hits"].delete(_PID.pack(pid))
        self._forget_calls(pid)

    def _forget_calls(self, pid: int) -> None:
        tgid = _PID.pack(pid)  # the first field of every key of these maps
        for table in CALL_MAPS:
            for key in self._maps[table].all_keys():
                if key[:4] == tgid:
                    self._maps[table].delete(key)

    def kernel_entries(self, pid: int) -> dict[str, int]:
        """How many entries of each per-process map hold `pid` (0 everywhere once it is
        detached: a leak shows here)."""
        tgid = _PID.pack(pid)
        return {
            name: sum(key[:4] == tgid for key in self._maps[name].all_keys())
            for name in PER_PROCESS_MAPS
        }

    def sweep_abandoned_calls(self, older_than_ns: int) -> int:
        """Forget calls that entered longer ago than `older_than_ns` and never returned.

        A Go function that panics (and is recovered further up) or calls runtime.Goexit
        leaves through no RET, so its entry would stay in the table forever: goroutine ids
        are never reused. Returns how many were removed."""
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        table = self._maps["calls_in_flight"]
        removed = 0
        for key in table.all_keys():
            value = table.lookup(key)
            if value is not None and now - _U64.unpack_from(value)[0] > older_than_ns:
                removed += table.delete(key)
        return removed

    def counters(self) -> dict[str, int]:
        # Perf buffers too: a full buffer fails perf_submit, which the program counts itself.
        table = self._maps["counters"]
        out = {}
        for name, slot in COUNTERS.items():
            value = table.lookup(_PID.pack(slot))
            out[name] = int(np.frombuffer(value, dtype="<u8").sum()) if value else 0
        return out

    def process_hits(self, pid: int) -> np.void | None:
        """One process's PROBE_HITS record, summed over CPUs (one map lookup); None when
        no probe ran for it."""
        per_cpu = self._maps["probe_hits"].lookup(_PID.pack(pid))
        return None if per_cpu is None else _summed_hits(per_cpu)

    def probe_hits(self) -> dict[int, np.void]:
        """Per traced process, how often each program ran for it (a PROBE_HITS record,
        summed over CPUs)."""
        table = self._maps["probe_hits"]
        hits = {}
        for key in table.all_keys():
            per_cpu = table.lookup(key)
            if per_cpu is None:  # the process was detached meanwhile
                continue
            hits[_PID.unpack(key)[0]] = _summed_hits(per_cpu)
        return hits

    def program_run_stats(self) -> dict[str, RunStats]:
        """Run time and count of every loaded program, by its name in the BPF source."""
        return {name: program_run_stats(fd) for name, fd in self._obj.programs.items()}

    def attach_trap_calibration(self, binary: str, symbol: str, pid: int) -> None:
        """The empty `trap_calibration` program on `symbol` of `binary`, in `pid` only."""
        try:
            offset = SymbolTable.from_path(binary).lookup(symbol).file_offset
            self._calibration_links.append(
                attach_uprobe(self._obj.programs["trap_calibration"], binary, offset, pid)
            )
        except (OSError, AgentError) as exc:
            raise KernelSupportError(
                f"attaching the calibration uprobe to {symbol} in {binary} failed: {exc}"
            ) from exc

    def detach_trap_calibration(self) -> None:
        for fd in self._calibration_links:
            os.close(fd)
        self._calibration_links.clear()

    @property
    def attached_uprobes(self) -> int:
        """Uprobe descriptors currently attached, all processes (a leak shows here): a
        uprobe_multi link holds one function's probes of one kind, a perf event one probe."""
        processes = list(self._processes.values())  # attaches run in the pipeline's thread
        return len(self._calibration_links) + sum(len(p.links) for p in processes)

    def set_synthetic_pid(self, pid: int) -> None:
        self._maps["synthetic_pid"].update(_PID.pack(0), _PID.pack(pid))

    def close(self) -> None:
        for pid in list(self._processes):
            self.detach_process(pid)
        for reader in (self.span_reader, self.http_reader, self.net_reader):
            if reader is not None:
                reader.close()
        self.detach_trap_calibration()
        self._closer.shutdown()
        self._obj.close()
        self.run_time_stats.close()


def _summed_hits(per_cpu: bytes) -> np.void:
    values = np.frombuffer(per_cpu, dtype=PROBE_HITS)
    total = np.zeros(1, dtype=PROBE_HITS)
    for name in PROBE_HITS.names or ():
        total[name] = values[name].sum()
    return total[0]


def start_compiling(options: ProbeOptions) -> CompileHelper | None:
    """Start the compile helper now, so that it compiles while the caller does other
    start-up work; pass it to AgentProbes. None when the options compile in-process."""
    options = _checked(options)
    if options.use_perf_buffer or options.loader == "in-process":
        return None
    return CompileHelper(*_object_spec(options))


def _checked(options: ProbeOptions) -> ProbeOptions:
    options = replace(options, net_hooks=choose_net_hooks(options.net_hooks))
    if options.loader not in LOADERS:
        raise KernelSupportError(
            f"BPF loader {options.loader!r}: choose one of {', '.join(LOADERS)}"
        )
    require_privileges()
    if not options.use_perf_buffer and not _kernel_has_ringbuf():
        raise KernelSupportError(
            "this kernel has no BPF ring buffer (needs Linux 5.8); "
            "run the agent with --event-transport perf"
        )
    return options


def _rings(options: ProbeOptions) -> list[str]:
    net = options.net_hooks != "off"
    return ["span_events", "http_events", "client_events"] + (["net_events"] if net else [])


def _object_spec(options: ProbeOptions) -> tuple[list[Path], list[str], list[str]]:
    """Sources, compile flags and the maps the agent uses, of one options set."""
    net = options.net_hooks != "off"
    sources = [SPAN_SOURCE] + ([NET_SOURCE] if net else [])
    maps = [*SPAN_MAPS, *_rings(options)]
    if options.synthetic_burst:
        maps.append("synthetic_pid")
    return sources, options.cflags(), maps


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
