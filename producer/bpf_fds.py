"""BPF maps and probe attachments through file descriptors, without BCC.

The agent gets its programs and maps as descriptors from the compile helper
(producer/bpf_compiler.py); from then on it needs only two system calls, made here with
ctypes:

    bpf(MAP_LOOKUP/UPDATE/DELETE/GET_NEXT_KEY, OBJ_GET_INFO_BY_FD)   -> BpfMap
    perf_event_open(uprobe / kprobe PMU, or a tracepoint id) + ioctl(SET_BPF, ENABLE)
                                                                     -> attach_* (a link fd)

A probe is attached for as long as its perf event descriptor is open: closing it detaches
the program, and the kernel drops the probe itself when the last user is gone, so a traced
process that exits leaves nothing behind (no tracefs event to remove by name).

Closing a uprobe's perf event is slow and serial: the kernel takes its one `event_mutex`
(perf_uprobe_destroy) and, holding it, waits for an RCU tasks-trace grace period
(uprobe_unregister_sync), ~110 ms on this VM: 80 closes take 8.5 s from 32 threads and
10.2 s from one, and perf_event_open of a new uprobe waits for the same mutex behind every
close queued on it. A uprobe_multi link (BPF_LINK_CREATE, Linux 6.6+) holds every probe of
a function in one descriptor and is released without that mutex: 80 links close in 0.23 s
from 32 threads. The agent uses links where the kernel has them, perf events elsewhere.
`LinkCloser` closes off the caller's thread (one thread for perf events, several for links)
and gives way while probes are being attached (`attaching()`), so a new process's probes
wait for at most the closes under way, never for the backlog.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ebpf_apm.producer.errors import KernelSupportError

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_UPDATE_ELEM, _BPF_MAP_DELETE_ELEM = 1, 2, 3
_BPF_MAP_GET_NEXT_KEY, _BPF_MAP_GET_FD_BY_ID, _BPF_OBJ_GET_INFO_BY_FD = 4, 14, 15
_PERCPU_TYPES = {5, 6, 10, 21}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP
_BPF_LINK_CREATE = 28
BPF_TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type
_BPF_F_UPROBE_MULTI_RETURN = 1
_PERF_TYPE_TRACEPOINT = 2
_PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5: every field used here is in it
_PERF_EVENT_IOC_ENABLE = 0x2400
_PERF_EVENT_IOC_SET_BPF = 0x40042408
_PERF_FLAG_FD_CLOEXEC = 1 << 3
PMU_DIR = Path("/sys/bus/event_source/devices")
TRACEFS_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger(__name__)


def _syscall_number(table: dict[str, int]) -> int:
    number = table.get(os.uname().machine)
    if number is None:
        raise KernelSupportError(f"no BPF system call numbers for {os.uname().machine}")
    return number


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    result = int(_libc.syscall(_syscall_number(_SYS_BPF), cmd, attr, len(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


@cache
def possible_cpus() -> int:
    """Per-CPU map values hold one slot per possible CPU (not per online CPU)."""
    count = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


@dataclass(frozen=True)
class MapInfo:
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str  # the kernel keeps the first 15 bytes of the name in the source


def map_info(fd: int) -> MapInfo:
    """The kernel's own description of the map behind `fd` (struct bpf_map_info)."""
    info = ctypes.create_string_buffer(64)
    attr = ctypes.create_string_buffer(16)
    ctypes.c_uint32.from_buffer(attr, 0).value = fd
    ctypes.c_uint32.from_buffer(attr, 4).value = len(info)
    ctypes.c_uint64.from_buffer(attr, 8).value = ctypes.addressof(info)
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    fields = (ctypes.c_uint32 * 5).from_buffer_copy(info.raw[:20])
    name = info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(fields[0], fields[2], fields[3], fields[4], name)


def open_map_by_id(map_id: int) -> int:
    """A new descriptor of the map with kernel id `map_id` (how a test looks into another
    process's maps: its /proc/PID/fdinfo names their ids)."""
    attr = ctypes.create_string_buffer(16)
    ctypes.c_uint32.from_buffer(attr, 0).value = map_id
    return _bpf(_BPF_MAP_GET_FD_BY_ID, attr)


class BpfMap:
    """One map by descriptor; keys and values are raw bytes (numpy records give them).

    Per-CPU maps read and write one value per possible CPU, each padded to 8 bytes."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.info = map_info(fd)
        self.percpu = self.info.type in _PERCPU_TYPES
        slot = (self.info.value_size + 7) & ~7
        self.value_bytes = slot * possible_cpus() if self.percpu else self.info.value_size

    def _attr(
        self, key: bytes | None, value: ctypes.Array[ctypes.c_char] | None
    ) -> tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char] | None]:
        """The attr block of a map element command, and the key buffer it points into
        (returned so that it lives as long as the attr)."""
        attr = ctypes.create_string_buffer(32)
        ctypes.c_uint32.from_buffer(attr, 0).value = self.fd
        key_buf = None
        if key is not None:
            if len(key) != self.info.key_size:
                raise ValueError(f"map {self.name}: key of {len(key)} bytes, wants "
                                 f"{self.info.key_size}")  # fmt: skip
            key_buf = ctypes.create_string_buffer(key, len(key))
            ctypes.c_uint64.from_buffer(attr, 8).value = ctypes.addressof(key_buf)
        if value is not None:
            ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(value)
        return attr, key_buf

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_bytes)
        attr, _keep = self._attr(key, value)
        try:
            _bpf(_BPF_MAP_LOOKUP_ELEM, attr)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return value.raw

    def update(self, key: bytes, value: bytes) -> None:
        if len(value) != self.value_bytes:
            raise ValueError(f"map {self.name}: value of {len(value)} bytes, wants "
                             f"{self.value_bytes}")  # fmt: skip
        buf = ctypes.create_string_buffer(value, len(value))
        attr, _keep = self._attr(key, buf)
        _bpf(_BPF_MAP_UPDATE_ELEM, attr)  # flags 0: BPF_ANY

    def delete(self, key: bytes) -> bool:
        attr, _keep = self._attr(key, None)
        try:
            _bpf(_BPF_MAP_DELETE_ELEM, attr)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def all_keys(self) -> list[bytes]:
        """Every key, read before the caller changes the map (deleting while walking would
        restart the walk)."""
        found: list[bytes] = []
        next_key = ctypes.create_string_buffer(self.info.key_size)
        key: bytes | None = None
        while True:
            attr, _keep = self._attr(key, next_key)
            try:
                _bpf(_BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return found
                raise
            key = next_key.raw
            found.append(key)


def attach_uprobe(prog_fd: int, binary: str, file_offset: int, pid: int, ret: bool = False) -> int:
    """A uprobe (or uretprobe) at `file_offset` of `binary`, in `pid` only; returns the perf
    event descriptor that keeps it attached."""
    path = ctypes.create_string_buffer(binary.encode())
    return _probe_event("uprobe", ctypes.addressof(path), file_offset, ret, pid, prog_fd)


def attach_uprobe_multi(
    prog_fd: int, binary: str, file_offsets: list[int], pid: int, ret: bool = False
) -> int:
    """One uprobe_multi link (Linux 6.6+) for every offset of `binary`, in `pid` only; the
    program must have been loaded for BPF_TRACE_UPROBE_MULTI. Returns the link descriptor:
    closing it detaches every probe of the link at once, after one grace period, and not
    under the kernel's perf event mutex, so closes from several threads overlap."""
    path = ctypes.create_string_buffer(binary.encode())
    offsets = (ctypes.c_uint64 * len(file_offsets))(*file_offsets)
    attr = ctypes.create_string_buffer(64)  # union bpf_attr, link_create.uprobe_multi
    ctypes.c_uint32.from_buffer(attr, 0).value = prog_fd
    ctypes.c_uint32.from_buffer(attr, 8).value = BPF_TRACE_UPROBE_MULTI
    ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(path)
    ctypes.c_uint64.from_buffer(attr, 24).value = ctypes.addressof(offsets)
    ctypes.c_uint32.from_buffer(attr, 48).value = len(file_offsets)
    ctypes.c_uint32.from_buffer(attr, 52).value = _BPF_F_UPROBE_MULTI_RETURN if ret else 0
    ctypes.c_uint32.from_buffer(attr, 56).value = pid
    try:
        return _bpf(_BPF_LINK_CREATE, attr)
    except OSError as exc:
        raise OSError(exc.errno, f"uprobe_multi link: {exc.strerror}") from None


def attach_kprobe(prog_fd: int, function: str, ret: bool = False) -> int:
    name = ctypes.create_string_buffer(function.encode())
    return _probe_event("kprobe", ctypes.addressof(name), 0, ret, -1, prog_fd)


def attach_tracepoint(prog_fd: int, category: str, event: str) -> int:
    for root in TRACEFS_ROOTS:
        id_file = root / "events" / category / event / "id"
        if id_file.exists():
            return _perf_event(_PERF_TYPE_TRACEPOINT, int(id_file.read_text()), 0, 0, -1, prog_fd)
    raise KernelSupportError(
        f"tracepoint {category}:{event} not found under {' or '.join(map(str, TRACEFS_ROOTS))}; "
        "mount tracefs (mount -t tracefs nodev /sys/kernel/tracing)"
    )


@cache
def _pmu(kind: str) -> tuple[int, int]:
    """The dynamic PMU's type number and its retprobe bit in `config`."""
    try:
        pmu_type = int((PMU_DIR / kind / "type").read_text())
        bit = int((PMU_DIR / kind / "format/retprobe").read_text().strip().split(":")[1])
    except (OSError, ValueError, IndexError) as exc:
        raise KernelSupportError(
            f"this kernel has no {kind} PMU ({PMU_DIR / kind}: {exc}); it needs Linux 4.17"
        ) from exc
    return pmu_type, bit


def _probe_event(kind: str, name_ptr: int, offset: int, ret: bool, pid: int, prog_fd: int) -> int:
    pmu_type, ret_bit = _pmu(kind)
    return _perf_event(pmu_type, (1 << ret_bit) if ret else 0, name_ptr, offset, pid, prog_fd)


def _perf_event(type_: int, config: int, config1: int, config2: int, pid: int, prog_fd: int) -> int:
    attr = ctypes.create_string_buffer(_PERF_ATTR_SIZE)
    ctypes.c_uint32.from_buffer(attr, 0).value = type_
    ctypes.c_uint32.from_buffer(attr, 4).value = _PERF_ATTR_SIZE
    ctypes.c_uint64.from_buffer(attr, 8).value = config
    ctypes.c_uint64.from_buffer(attr, 16).value = 1  # sample_period
    ctypes.c_uint32.from_buffer(attr, 48).value = 1  # wakeup_events
    ctypes.c_uint64.from_buffer(attr, 56).value = config1  # uprobe_path / kprobe_func
    ctypes.c_uint64.from_buffer(attr, 64).value = config2  # probe_offset
    # A BPF program on a trace event runs whichever CPU hits it; cpu 0 only names the event.
    cpu = 0 if pid < 0 else -1
    fd = int(
        _libc.syscall(
            _syscall_number(_SYS_PERF_EVENT_OPEN), attr, pid, cpu, -1, _PERF_FLAG_FD_CLOEXEC
        )
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open: {os.strerror(err)}")
    try:
        for request, arg in ((_PERF_EVENT_IOC_SET_BPF, prog_fd), (_PERF_EVENT_IOC_ENABLE, 0)):
            if _libc.ioctl(fd, request, arg) < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"ioctl {request:#x} on a perf event: {os.strerror(err)}")
    except OSError:
        os.close(fd)
        raise
    return fd


class LinkCloser:
    """Closes probe descriptors in threads of its own, pausing while probes are attached
    (see the module docstring): detaching never holds up the caller, and the backlog of
    closes never holds up an attach. `workers`: 1 for perf events (their closes run one at a
    time in the kernel anyway), more for uprobe_multi links."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self._queue: deque[int] = deque()
        self._cond = threading.Condition()
        self._attaching = 0  # attach sections under way
        self._closing = 0  # closes in the kernel now
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def close(self, fds: Iterable[int]) -> None:
        """Hand descriptors over; they are closed soon (or by `shutdown`)."""
        fds = list(fds)
        with self._cond:
            stopped = self._stopping
            if not stopped:
                self._queue.extend(fds)
                while len(self._threads) < min(self.workers, len(self._queue)):
                    thread = threading.Thread(target=self._run, name="probe-detach", daemon=True)
                    thread.start()
                    self._threads.append(thread)
                self._cond.notify_all()
        if stopped:  # shut down: nothing else will close them
            for fd in fds:
                os.close(fd)

    @contextlib.contextmanager
    def attaching(self) -> Iterator[None]:
        """No close starts while the block runs (those already in the kernel finish)."""
        with self._cond:
            self._attaching += 1
        try:
            yield
        finally:
            with self._cond:
                self._attaching -= 1
                self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Descriptors handed over and not closed yet (probes still attached in the kernel)."""
        with self._cond:
            return len(self._queue) + self._closing

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue or (self._attaching and not self._stopping):
                    if self._stopping and not self._queue:
                        return
                    self._cond.wait()
                fd = self._queue.popleft()
                self._closing += 1
            try:
                os.close(fd)
            except OSError as exc:  # a bug (closed twice); the others still get closed
                log.error("closing probe descriptor %d: %s", fd, exc)
            finally:
                with self._cond:
                    self._closing -= 1
                    self._cond.notify_all()

    def shutdown(self) -> None:
        """Returns once every descriptor handed over is closed (every probe detached)."""
        with self._cond:
            self._stopping = True
            threads = list(self._threads)
            self._cond.notify_all()
        for thread in threads:
            thread.join()
        with self._cond:  # handed over with no thread running: close them here
            fds, self._queue = list(self._queue), deque()
        for fd in fds:
            os.close(fd)
