"""Which processes exist, as they come and go: a /proc scan, then exec and exit tracepoints.

    start: attach bpf/process_events.bpf.c  ->  scan /proc (reported as "running")
    then:  sched_process_exec -> "exec",  process end -> "exit"   (BPF ring buffer)

The tracepoints are attached before the scan, so no process that starts in between is
missed; a process can then be reported twice (running, then exec), and a process that
execs again is reported again: consumers treat every "exec" as "look at this pid afresh".

The binary of a process is read as /proc/PID/exe and its other files under /proc/PID/root,
so processes in other mount namespaces (containers) resolve from the agent's. Identical
binaries, one image shared by many pods, are resolved once: `ResolveOnceCache` keys the
result by the file's device, inode and mtime, then by its build id.

BCC compiles the program in a helper process (producer.bpf_compiler); this process gets
its programs and maps as descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from ebpf_apm import bpf as bpf_sources
from ebpf_apm.producer.bpf_compiler import LoadedObject, attach_named_programs, compile_in_helper
from ebpf_apm.producer.errors import AgentError, KernelSupportError, PrivilegeError
from ebpf_apm.producer.ringbuf_reader import RingBufReader

__all__ = [
    "PROCESS_EVENT",
    "BinaryKey",
    "ProcessDiscovery",
    "ProcessEvent",
    "ProcessEventSource",
    "ResolveOnceCache",
    "exe_path",
    "path_in_process",
    "read_build_id",
    "scan_processes",
]

log = logging.getLogger(__name__)

BPF_DIR = bpf_sources.source_dir()
PROCESS_PROGRAM = BPF_DIR / "process_events.bpf.c"
PROCESS_MAPS = ("process_events", "process_counters")
EXIT_FORMATS = (
    Path("/sys/kernel/tracing/events/sched/sched_process_exit/format"),
    Path("/sys/kernel/debug/tracing/events/sched/sched_process_exit/format"),
)

EVENT_KIND_PROCESS_EXEC = 16
EVENT_KIND_PROCESS_EXIT = 17
# Slots of the per-CPU `process_counters` array (PROCESS_COUNTER_* in the header).
PROCESS_COUNTERS = {"ring_full": 0, "emitted": 1}

# Mirror of struct process_event (bpf/process_events.h); a test compiles the header.
PROCESS_EVENT = np.dtype(
    [
        ("kind", "<u2"),
        ("size", "<u2"),
        ("pid", "<u4"),
        ("ts_ns", "<u8"),
        ("tid", "<u4"),
        ("_pad", "<u4"),
        ("comm", "S16"),
    ],
    align=True,
)
C_FIELDS = {
    "process_event": {
        "hdr.kind": "kind",
        "hdr.size": "size",
        "hdr.pid": "pid",
        "hdr.ts_ns": "ts_ns",
        "tid": "tid",
        "comm": "comm",
    }
}


class ProcessEvent(NamedTuple):
    kind: str  # "running" (found by the scan), "exec", "exit"
    pid: int
    ts_ns: int  # CLOCK_BOOTTIME; 0 for "running"
    tid: int = 0
    comm: str = ""


class ProcessEventSource:
    """The exec/exit tracepoints in the kernel and the ring buffer they write to.

    `poll()` never blocks: call it on a timer (records do not wake the reader one by one)
    or when `fileno` turns readable (the kernel wakes it every `wakeup_every` records per
    CPU)."""

    def __init__(self, ring_pages: int = 64, wakeup_every: int = 32) -> None:
        self.ring_pages = ring_pages
        self.wakeup_every = wakeup_every
        self._obj: LoadedObject | None = None
        self._reader: RingBufReader | None = None

    def cflags(self) -> list[str]:
        flags = [
            f"-I{BPF_DIR}",
            f"-DPROCESS_RING_PAGES={self.ring_pages}",
            f"-DWAKEUP_EVERY={self.wakeup_every}",
        ]
        if _exit_has_group_dead():
            flags.append("-DHAVE_GROUP_DEAD")
        return flags

    def start(self) -> None:
        if self._obj is not None:
            return
        if os.geteuid() != 0 and not _has_bpf_caps():
            raise PrivilegeError(
                "watching exec/exit tracepoints needs root or CAP_BPF and CAP_PERFMON"
            )
        # Compiled in a helper process: this process never maps BCC or LLVM.
        obj = compile_in_helper([PROCESS_PROGRAM], self.cflags(), PROCESS_MAPS)
        try:
            attach_named_programs(obj)
        except (OSError, KernelSupportError) as exc:
            obj.close()
            raise KernelSupportError(
                f"attaching {PROCESS_PROGRAM.name} to the sched tracepoints failed: {exc}"
            ) from exc
        self._obj = obj
        self._reader = RingBufReader(obj.maps["process_events"].fd, self.ring_pages, PROCESS_EVENT)

    @property
    def fileno(self) -> int:
        if self._obj is None:
            raise RuntimeError("ProcessEventSource.start() first")
        return self._obj.maps["process_events"].fd

    def poll(self) -> list[ProcessEvent]:
        if self._reader is None:
            return []
        records = self._reader.drain()
        out = []
        for r in records:
            kind = int(r["kind"])
            if kind == EVENT_KIND_PROCESS_EXEC:
                name = "exec"
            elif kind == EVENT_KIND_PROCESS_EXIT:
                name = "exit"
            else:
                log.warning("process ring: record of unknown kind %d skipped", kind)
                continue
            comm = bytes(r["comm"]).split(b"\0", 1)[0].decode("utf-8", "replace")
            out.append(ProcessEvent(name, int(r["pid"]), int(r["ts_ns"]), int(r["tid"]), comm))
        return out

    def counters(self) -> dict[str, int]:
        if self._obj is None:
            return dict.fromkeys(PROCESS_COUNTERS, 0)
        table = self._obj.maps["process_counters"]
        out = {}
        for name, slot in PROCESS_COUNTERS.items():
            value = table.lookup(slot.to_bytes(4, "little"))
            out[name] = int(np.frombuffer(value, dtype="<u8").sum()) if value else 0
        return out

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> ProcessEventSource:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exit_has_group_dead() -> bool:
    for path in EXIT_FORMATS:
        with contextlib.suppress(OSError):
            return "group_dead" in path.read_text()
    return False


def _has_bpf_caps() -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                return bool(caps >> 39 & 1 and caps >> 38 & 1) or bool(caps >> 21 & 1)
    return False


# --- /proc ---------------------------------------------------------------------------------


def scan_processes(proc: str = "/proc") -> list[int]:
    """Running user-space processes (kernel threads, which have no executable, left out)."""
    pids = []
    for entry in os.scandir(proc):
        if entry.name.isdigit():
            try:
                os.readlink(f"{proc}/{entry.name}/exe")
            except OSError:
                continue
            pids.append(int(entry.name))
    return sorted(pids)


def exe_path(pid: int) -> str:
    """The executable's path as the process sees it, in its own mount namespace."""
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} has exited") from None


def path_in_process(pid: int, path: str) -> str:
    """A path that reaches `path` of the process's mount namespace from the agent's."""
    return f"/proc/{pid}/root/{path.lstrip('/')}"


# --- resolve each binary once ----------------------------------------------------------


class BinaryKey(NamedTuple):
    dev: int
    ino: int
    mtime_ns: int
    size: int


_NT_GNU_BUILD_ID = 3
_NT_GO_BUILD_ID = 4
_PHDR_SIZE = 56  # Elf64_Phdr


def read_build_id(path: str, limit: int = 1 << 20) -> str | None:
    """The GNU build id note of an ELF file, else Go's build id note, as hex; None if absent.

    Reads the program headers' PT_NOTE segments only (the start of the file). Header fields
    of a damaged file can point anywhere: every table must lie inside the file, else the
    file has no usable id (None) and is told apart by device and inode alone."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
                return None  # not a little-endian ELF64
            phoff, phentsize, phnum = (
                struct.unpack_from("<Q", ident, 32)[0],
                *struct.unpack_from("<HH", ident, 54),
            )
            if phentsize < _PHDR_SIZE or phoff + phentsize * phnum > size:
                return None
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            found: dict[int, str] = {}
            for i in range(phnum):
                p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
                    "<IIQQQQ", table, i * phentsize
                )
                if p_type != 4 or p_filesz > limit or p_offset + p_filesz > size:  # PT_NOTE
                    continue
                f.seek(p_offset)
                found.update(_notes(f.read(p_filesz)))
    except (OSError, ValueError, struct.error):
        return None
    return found.get(_NT_GNU_BUILD_ID) or found.get(_NT_GO_BUILD_ID)


def _notes(data: bytes) -> dict[int, str]:
    out, at = {}, 0
    while at + 12 <= len(data):
        namesz, descsz, kind = struct.unpack_from("<III", data, at)
        name_end = at + 12 + ((namesz + 3) & ~3)
        desc = data[name_end : name_end + descsz]
        name = data[at + 12 : at + 12 + namesz].rstrip(b"\0")
        if name == b"GNU" and kind == _NT_GNU_BUILD_ID:
            out[kind] = desc.hex()
        elif name == b"Go" and kind == _NT_GO_BUILD_ID:
            out[kind] = "go:" + desc.decode("ascii", "replace")
        at = name_end + ((descsz + 3) & ~3)
    return out


T = TypeVar("T")


_MISSING: Any = object()


@dataclass(frozen=True)
class _Failure:
    error: AgentError


class ResolveOnceCache(Generic[T]):
    """Runs `resolver(path)` once per distinct binary and keeps what it returns.

    `get(pid)` stats /proc/PID/exe (the executable itself, whatever mount namespace it is
    in): a known (device, inode, mtime, size) is a hit; otherwise the build id is read and a
    known build id is a hit; otherwise the resolver runs on the path /proc/PID/exe. An
    AgentError it raises (an unsupported binary, say) is remembered too and raised again on
    every hit, so the shell scripts of a busy node, or a damaged binary exec'd in a loop,
    are looked at once. A failure is remembered for that file only, never for its build id:
    a damaged copy still carries the id of the intact binary it was copied from. Errors of
    a process that vanished mid-read are not remembered (ProcessLookupError). At most
    `max_entries` binaries are kept, least recently used first out. The resolver must not
    keep the pid-specific path: the result is shared by every process of that binary."""

    def __init__(
        self, resolver: Callable[[str], T], max_entries: int = 256, use_build_id: bool = True
    ) -> None:
        self.resolver = resolver
        self.max_entries = max_entries
        self.use_build_id = use_build_id
        self.hits = 0
        self.misses = 0
        self._by_file: OrderedDict[BinaryKey, T | _Failure] = OrderedDict()
        self._by_build_id: OrderedDict[str, T | _Failure] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_file)

    def get(self, pid: int) -> T:
        path = f"/proc/{pid}/exe"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ProcessLookupError(f"process {pid} has exited") from None
        key = BinaryKey(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        value = self._by_file.get(key, _MISSING)
        if value is not _MISSING:
            self.hits += 1
            self._by_file.move_to_end(key)
            return _unwrap(value)
        build_id = read_build_id(path) if self.use_build_id else None
        value = self._by_build_id.get(build_id, _MISSING) if build_id else _MISSING
        if value is _MISSING:
            value = self._resolve(path)
            if build_id and not isinstance(value, _Failure):
                _remember(self._by_build_id, build_id, value, self.max_entries)
        elif build_id:
            self.hits += 1
            self._by_build_id.move_to_end(build_id)
        _remember(self._by_file, key, value, self.max_entries)
        return _unwrap(value)

    def _resolve(self, path: str) -> T | _Failure:
        self.misses += 1
        try:
            return self.resolver(path)
        except AgentError as exc:
            if not os.path.exists(path):  # the process exited mid-read: not the file's fault
                raise ProcessLookupError(f"{path}: the process exited") from exc
            return _Failure(exc)

    def clear(self) -> None:
        self._by_file.clear()
        self._by_build_id.clear()


def _remember(table: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


def _unwrap(value: T | _Failure) -> T:
    if isinstance(value, _Failure):
        raise value.error
    return value


# --- asyncio glue --------------------------------------------------------------------------


class ProcessDiscovery:
    """Runs a ProcessEventSource in the event loop and calls `on_event` for each event:
    first every running process, then execs and exits as they happen. Keeps no state per
    process. `poll_interval_s` bounds how late an event is seen (the agent needs < 1 s)."""

    def __init__(
        self,
        on_event: Callable[[ProcessEvent], None],
        source: ProcessEventSource | None = None,
        poll_interval_s: float = 0.1,
        scan: bool = True,
    ) -> None:
        self.on_event = on_event
        self.source = source or ProcessEventSource()
        self.poll_interval_s = poll_interval_s
        self.scan = scan
        self.delivered = 0
        self._task: asyncio.Task[None] | None = None
        self._fd: int | None = None

    async def start(self) -> None:
        self.source.start()  # before the scan: nothing starts unseen in between
        loop = asyncio.get_running_loop()
        self._fd = self.source.fileno
        loop.add_reader(self._fd, self.poll_now)
        if self.scan:
            for pid in scan_processes():
                self._deliver(ProcessEvent("running", pid, 0))
        self._task = asyncio.create_task(self._poll_periodically(), name="process-discovery")

    def poll_now(self) -> None:
        for event in self.source.poll():
            self._deliver(event)

    def _deliver(self, event: ProcessEvent) -> None:
        self.delivered += 1
        try:
            self.on_event(event)
        except Exception:  # the consumer's bug must not stop discovery
            log.exception("process event handler failed on %s", event)

    async def _poll_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            self.poll_now()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None
        self.poll_now()
        self.source.close()
