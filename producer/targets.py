"""From `--pid`/`--exe`/`--func` to what must be probed in each process.

A target process is read through /proc/PID/exe, so the binary is found even when the process
lives in another mount namespace. Each function to time gets an agent-wide id that the span
records carry; the batcher turns ids back into names.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from ebpf_apm.producer.binary_guard import BinaryLimits, parsing
from ebpf_apm.producer.bpf_loader import AgentProbes, ProcessLayout
from ebpf_apm.producer.client_probes import client_probes
from ebpf_apm.producer.elf_symbols import SymbolTable
from ebpf_apm.producer.errors import TargetError, UnsupportedBinary
from ebpf_apm.producer.go_binary import go_layout
from ebpf_apm.producer.map_layout import SITE_FLAG_H2, SITE_FLAG_SPAWN
from ebpf_apm.producer.probe_sites import ProbePlan, plan_function
from ebpf_apm.producer.server_probes import creator_offsets, server_probes, traceparent_fields

log = logging.getLogger(__name__)

# Every request a Go net/http server serves passes through this method.
HTTP_SERVER_SYMBOL = "net/http.serverHandler.ServeHTTP"
# ...and an HTTP/1 response is flushed by this one after ServeHTTP returns, on the same
# goroutine: HTTP spans end when it returns, so they hold the whole response.
HTTP_FINISH_SYMBOL = "net/http.(*response).finishRequest"
SPAWN_SYMBOL = "runtime.newproc1"  # makes every goroutine (bpf/probe_maps.h SITE_FLAG_SPAWN)


class FunctionNames:
    """Agent-wide ids of probed functions; the BPF records carry the id, batches the name.

    Binaries are planned in a worker thread while the batcher reads `names` on the event
    loop: ids are handed out under a lock and `names` only ever grows."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self.names: list[str] = []
        self._lock = threading.Lock()

    def id_of(self, name: str) -> int:
        with self._lock:
            if name not in self._ids:
                self._ids[name] = len(self.names)
                self.names.append(name)
            return self._ids[name]


@dataclass(frozen=True)
class FunctionTarget:
    func_id: int
    plan: ProbePlan
    http: bool
    http_finish: bool = False  # only its returns, ending the HTTP span `func_id`
    # HTTP/2 and gRPC servers (producer/server_probes.py): SITE_FLAG_* and field offsets
    server_flags: int = 0
    fields: tuple[int, int, int, int, int] = (-1, -1, -1, -1, -1)
    entry_only: bool = False  # only its entry, adding to the span `func_id` (WriteStatus)
    returns_only: bool = False  # only its returns (runtime.newproc1, see SITE_FLAG_SPAWN)


@dataclass
class TargetProcess:
    pid: int
    exe: str  # the executable's path inside the process's own mount namespace
    binary: str  # a path to the same file that works from the agent: /proc/PID/exe
    load_bias: int
    layout: ProcessLayout
    go_version: str | None
    functions: list[FunctionTarget] = field(default_factory=list)

    @property
    def exe_name(self) -> str:
        return os.path.basename(self.exe)


def _check_process(pid: int) -> str:
    if pid <= 0:
        raise TargetError(f"--pid {pid}: a process id is a positive number")
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise TargetError(
            f"no process with pid {pid}; check the pid (ps -e) or use --exe"
        ) from None
    except PermissionError:
        raise TargetError(
            f"cannot read /proc/{pid}/exe: permission denied; run the agent as root "
            "(or with CAP_SYS_PTRACE)"
        ) from None


def load_bias(pid: int, binary: str) -> int:
    """What the process added to the binary's ELF addresses when mapping it (PIE), else 0."""
    with open(binary, "rb") as f:
        header = f.read(18)
    if header[:4] != b"\x7fELF":
        raise UnsupportedBinary(binary, "not an ELF file")
    if int.from_bytes(header[16:18], "little") != 3:  # ET_DYN; ET_EXEC is mapped as linked
        return 0
    inode = os.stat(binary).st_ino
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and int(parts[4]) == inode and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise TargetError(f"cannot find the mapping of {binary} in /proc/{pid}/maps")


@dataclass(frozen=True)
class BinaryPlan:
    """What to probe in one executable file: the same for every process running it, so it
    is worked out once per binary (ResolveOnceCache) and bound to each process."""

    exe: str
    layout: ProcessLayout
    go_version: str | None
    functions: tuple[FunctionTarget, ...]


def plan_binary(
    binary: str,
    symbols: list[str],
    names: FunctionNames,
    http: bool = True,
    exe: str = "",
    limits: BinaryLimits | None = None,
) -> BinaryPlan:
    """Plan probes in one binary: `symbols`, plus Go's HTTP server when it has one and
    `http` is on. `exe` names the binary in messages. Reading the file stays within
    `limits` (size, parse time); a file that cannot be read or probed safely raises
    UnsupportedBinary naming `exe`."""
    exe = exe or binary
    try:
        with parsing(binary, limits):
            return _plan_binary(binary, symbols, names, http, exe)
    except UnsupportedBinary as exc:
        if exc.path != binary or exe == binary:
            raise
        raise type(exc)(exe, exc.reason) from exc  # the same error, naming the executable
    except OSError as exc:
        raise TargetError(f"cannot read the binary {exe}: {exc}") from exc


def _plan_binary(
    binary: str, symbols: list[str], names: FunctionNames, http: bool, exe: str
) -> BinaryPlan:
    table = SymbolTable.from_path(binary)
    go = table.is_go
    version = None
    if go:
        go_fields = go_layout(binary)
        version = go_fields.version
        layout = ProcessLayout(
            is_go=True,
            goid=go_fields.goid_offset,
            request_method=go_fields.request_method,
            request_url=go_fields.request_url,
            url_path=go_fields.url_path,
            response_status=go_fields.response_status,
        )
    else:
        layout = ProcessLayout(is_go=False)
    serves_http = go and HTTP_SERVER_SYMBOL in table
    servers = server_probes(table, go_layout(binary)) if go and http else []
    clients = client_probes(table, go_layout(binary)) if go and http else []
    if not symbols and not (http and (serves_http or servers or clients)):
        raise TargetError(
            f"{exe} is not a Go net/http or gRPC server nor an HTTP, gRPC or database/sql "
            "client, so there is nothing to trace automatically; name functions with "
            "--func SYMBOL"
            if http
            else f"{exe}: nothing to trace: HTTP tracing is off and no --func was given"
        )
    wanted = [(name, False) for name in symbols if name != HTTP_SERVER_SYMBOL]
    if http and (serves_http or servers):
        header, header_map = traceparent_fields(go_layout(binary))
        layout = replace(layout, request_header=header, header_map=header_map)
    if http and serves_http:
        offsets = (layout.request_method, layout.request_url, layout.url_path)
        if min(*offsets, layout.response_status) < 0:
            raise UnsupportedBinary(
                exe,
                f"net/http field offsets are unknown for Go {version}; trace handler "
                "functions with --func and --no-http instead",
            )
        wanted.append((HTTP_SERVER_SYMBOL, True))
    functions = tuple(
        FunctionTarget(names.id_of(name), plan_function(binary, table, name, go), is_http)
        for name, is_http in wanted
    )
    if http and serves_http and HTTP_FINISH_SYMBOL in table:
        finish = plan_function(binary, table, HTTP_FINISH_SYMBOL, go)
        if finish.return_offsets:
            http_id = names.id_of(HTTP_SERVER_SYMBOL)
            functions += (FunctionTarget(http_id, finish, True, http_finish=True),)
            layout = replace(layout, http_finish=True)
    for server in servers:
        functions += (
            FunctionTarget(
                names.id_of(server.span_symbol),
                plan_function(binary, table, server.symbol, go),
                False,
                server_flags=server.flags,
                fields=server.fields,
                entry_only=server.entry_only,
            ),
        )
    if go and SPAWN_SYMBOL in table:
        # Goroutine creation: the spans of goroutines a span starts descend from it.
        spawn = plan_function(binary, table, SPAWN_SYMBOL, go)
        if spawn.return_offsets:
            g_m, m_curg = creator_offsets(go_layout(binary))
            functions += (
                FunctionTarget(
                    names.id_of(SPAWN_SYMBOL),
                    spawn,
                    False,
                    server_flags=SITE_FLAG_SPAWN,
                    fields=(g_m, m_curg, -1, -1, -1),
                    returns_only=g_m >= 0,
                ),
            )
    if any(server.flags & SITE_FLAG_H2 for server in servers):
        layout = replace(layout, h2_server=True)
    for client in clients:
        functions += (
            FunctionTarget(
                names.id_of(client.span),
                plan_function(binary, table, client.symbol, go),
                False,
                server_flags=client.flags,
                fields=_with_other_span(client.fields, client.other_span, names),
                entry_only=client.entry_only,
            ),
        )
        # A client-only binary's table layout has no request offsets (no HTTP server).
        given = dict(client.layout)
        if given:
            layout = replace(
                layout,
                request_method=_known(layout.request_method, given["request_method"]),
                request_url=_known(layout.request_url, given["request_url"]),
                url_path=_known(layout.url_path, given["url_path"]),
            )
    return BinaryPlan(exe=exe, layout=layout, go_version=version, functions=functions)


def bind_process(pid: int, plan: BinaryPlan, exe: str | None = None) -> TargetProcess:
    """The plan of a binary, for one process running it (`exe`: its path, when known)."""
    exe = exe or _check_process(pid)
    binary = f"/proc/{pid}/exe"
    return TargetProcess(
        pid=pid,
        exe=exe,
        binary=binary,
        load_bias=load_bias(pid, binary),
        layout=plan.layout,
        go_version=plan.go_version,
        functions=list(plan.functions),
    )


def resolve_target(
    pid: int,
    symbols: list[str],
    names: FunctionNames,
    http: bool = True,
    limits: BinaryLimits | None = None,
) -> TargetProcess:
    """Plan probes in one process (see plan_binary)."""
    exe = _check_process(pid)
    try:
        plan = plan_binary(
            f"/proc/{pid}/exe", symbols, names, http, exe=f"pid {pid} ({exe})", limits=limits
        )
    except FileNotFoundError as exc:
        raise TargetError(f"process {pid} exited while its binary was read") from exc
    return bind_process(pid, plan, exe)


def _with_other_span(
    fields: tuple[int, int, int, int], other: str, names: FunctionNames
) -> tuple[int, int, int, int, int]:
    """A client probe's site fields (field_e unused); field_c := the function id of `other`
    (a second span the probe serves), if any."""
    a, b, c, d = fields
    return (a, b, names.id_of(other) if other else c, d, -1)


def _known(offset: int, fallback: int) -> int:
    return offset if offset >= 0 else fallback


def attach_target(probes: AgentProbes, target: TargetProcess) -> None:
    """Load one process's layout and attach every planned function's probes."""
    with probes.attaching():
        probes.add_process(target.pid, target.layout)
        try:
            _attach_functions(probes, target)
        except BaseException:
            # The process exited (or a probe failed) half-way: nothing of it may stay in the
            # maps, since no exit watch will ever come for it.
            probes.detach_process(target.pid)
            raise


def _attach_functions(probes: AgentProbes, target: TargetProcess) -> None:
    for fn in target.functions:
        probes.attach_function(
            target.pid,
            target.binary,
            target.load_bias,
            fn.plan.symbol.address,
            fn.plan.symbol.file_offset,
            fn.plan.entry_offset,
            fn.plan.return_offsets,
            fn.func_id,
            fn.http,
            target.layout.is_go,
            fn.http_finish,
            fn.server_flags,
            fn.fields,
            fn.entry_only,
            fn.returns_only,
        )


def pids_of_executable(path: str) -> list[int]:
    """Running processes whose executable is `path` (compared by device and inode)."""
    try:
        want = os.stat(path)
    except OSError as exc:
        raise TargetError(f"--exe {path}: {exc.strerror}") from exc
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(entry / "exe")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            found.append(int(entry.name))
    return sorted(found)
