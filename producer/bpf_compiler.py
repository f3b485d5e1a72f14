"""Compile and load a BPF object with BCC in a short-lived helper process; hand back its
programs and maps as file descriptors.

    agent: compile_in_helper(sources, cflags, maps)
      -> python -m ebpf_apm.producer.bpf_compiler REQUEST FD      (the helper)
           BCC: clang/LLVM compile, maps created, every function loaded (nothing attached)
           send_fds over the Unix socket FD: {"programs": [...], "maps": [...]} + descriptors
           exit: the compiler's heap and LLVM's pages go with it
      <- LoadedObject: prog fds by function name, BpfMap by map name

Why: BCC's compile leaves the agent ~130 MB of LLVM/clang pages and a large heap that a
node agent carries for nothing once the programs are loaded. Descriptors received over
SCM_RIGHTS keep the kernel objects alive after the helper exits; the agent attaches them
itself (producer/bpf_fds.py).

`compile_in_process` is the old design (the compiler stays in the caller): the perf-buffer
transport needs it, because BCC's perf buffer reader is BCC's, and benchmarks compare with it.
This module and process_discovery's helper call are the only places `bcc` is imported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebpf_apm.producer.bpf_fds import (
    BPF_TRACE_UPROBE_MULTI,
    BpfMap,
    attach_kprobe,
    attach_tracepoint,
)
from ebpf_apm.producer.errors import KernelSupportError

HELPER_TIMEOUT_S = 120.0
_MAX_MESSAGE = 1 << 16
# Programs attached by name (attach_named_programs); every other one is a uprobe program.
_NAMED_ATTACH = (b"tracepoint__", b"kprobe__", b"kretprobe__")
# A uprobe program loaded a second time for uprobe_multi links carries this suffix.
UPROBE_MULTI_SUFFIX = ".multi"


@dataclass
class LoadedObject:
    """One compiled BPF object, loaded in the kernel: nothing of it is attached yet."""

    programs: dict[str, int]  # function name -> program fd
    maps: dict[str, BpfMap]
    bcc: Any = None  # the BCC object when compiled in this process (it owns the fds)
    links: list[int] = field(default_factory=list)  # attach_named_programs' perf events

    def close(self) -> None:
        for fd in self.links:
            os.close(fd)
        self.links.clear()
        if self.bcc is not None:
            self.bcc.cleanup()
            self.bcc = None
        else:
            for fd in list(self.programs.values()) + [m.fd for m in self.maps.values()]:
                os.close(fd)
        self.programs, self.maps = {}, {}


def attach_named_programs(obj: LoadedObject) -> None:
    """Attach the functions BCC would attach by their names: `tracepoint__CAT__EVENT`,
    `kprobe__FUNC`, `kretprobe__FUNC` (the macros TRACEPOINT_PROBE and friends name them so)."""
    for name, fd in obj.programs.items():
        if name.startswith("tracepoint__"):
            category, _, event = name[len("tracepoint__") :].partition("__")
            obj.links.append(attach_tracepoint(fd, category, event))
        elif name.startswith("kprobe__"):
            obj.links.append(attach_kprobe(fd, name[len("kprobe__") :]))
        elif name.startswith("kretprobe__"):
            obj.links.append(attach_kprobe(fd, name[len("kretprobe__") :], ret=True))


class CompileHelper:
    """A compile running in a helper process, started at once: the caller does other
    start-up work meanwhile (the helper uses the other core) and collects the descriptors
    with `result()`."""

    def __init__(self, sources: Sequence[Path], cflags: Sequence[str], maps: Sequence[str]) -> None:
        self.sources = list(sources)
        request = json.dumps(
            {"sources": [str(s) for s in sources], "cflags": list(cflags), "maps": list(maps)}
        )
        self._socket, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._helper = subprocess.Popen(
                [sys.executable, "-m", __name__, request, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except BaseException:
            self._socket.close()
            raise
        finally:
            child.close()

    def result(self) -> LoadedObject:
        """Wait for the helper's descriptors (KernelSupportError if it failed)."""
        helper = self._helper
        self._socket.settimeout(HELPER_TIMEOUT_S)
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._socket, _MAX_MESSAGE, 253)
        except TimeoutError:
            helper.kill()
            data, fds = b"", []
        finally:
            self._socket.close()
        _out, err = helper.communicate(timeout=HELPER_TIMEOUT_S)
        reply = json.loads(data) if data else {}
        names = reply.get("programs", []) + reply.get("maps", [])
        if "error" in reply or not data or len(fds) != len(names):
            for fd in fds:
                os.close(fd)
            # clang prints its diagnostics to the helper's stderr: they are the useful part.
            output = err.decode(errors="replace").strip()[-2000:]
            parts = [reply.get("error"), output and f"compiler output:\n{output}"]
            why = "; ".join(p for p in parts if p) or f"the helper exited {helper.returncode}"
            raise KernelSupportError(
                f"could not compile or load the BPF object "
                f"{', '.join(s.name for s in self.sources)}: {why}. Check that kernel headers "
                "are installed and linked (`make setup`) and tracefs is mounted"
            )
        programs = dict(zip(reply["programs"], fds, strict=False))
        loaded = dict(zip(reply["maps"], fds[len(programs) :], strict=True))
        return LoadedObject(programs, {name: BpfMap(name, fd) for name, fd in loaded.items()})

    def cancel(self) -> None:
        """The caller failed before collecting: end the helper (this object's child)."""
        self._socket.close()
        if self._helper.poll() is None:
            self._helper.kill()
        self._helper.communicate()


def compile_in_helper(
    sources: Sequence[Path], cflags: Sequence[str], maps: Sequence[str]
) -> LoadedObject:
    """Compile and load in a helper process; the caller never maps the compiler."""
    return CompileHelper(sources, cflags, maps).result()


def compile_in_process(
    sources: Sequence[Path], cflags: Sequence[str], maps: Sequence[str]
) -> LoadedObject:
    """The old design: BCC compiles in this process and keeps its compiler mapped."""
    try:
        bpf, programs, map_fds = _compile(sources, cflags, maps)
    except Exception as exc:  # BCC raises bare Exception for compile and load failures
        raise KernelSupportError(
            f"could not compile or load the BPF probes: {exc}. Check that kernel "
            "headers are installed and linked (`make setup`) and tracefs is mounted"
        ) from exc
    return LoadedObject(programs, {n: BpfMap(n, fd) for n, fd in map_fds.items()}, bcc=bpf)


def _compile(
    sources: Sequence[Path], cflags: Sequence[str], maps: Sequence[str]
) -> tuple[Any, dict[str, int], dict[str, int]]:
    try:
        from bcc import BPF, lib  # noqa: PLC0415 - the compile helper's import, nowhere else
    except ImportError as exc:
        raise KernelSupportError(
            f"cannot import BCC ({exc}); run `make setup` (Debian package python3-bpfcc)"
        ) from exc

    class LoadOnly(BPF):
        """BCC without its attach-by-name at load: the agent attaches, and owns, every probe."""

        def _trace_autoload(self) -> None:
            pass

    # BCC turns only the functions of its main source into programs: join, don't #include.
    text = "\n".join(Path(source).read_text() for source in sources)
    bpf = LoadOnly(text=text.encode(), cflags=list(cflags))
    programs: dict[str, int] = {}
    for i in range(lib.bpf_num_functions(bpf.module)):
        name = lib.bpf_function_name(bpf.module, i)
        kind = BPF.TRACEPOINT if name.startswith(b"tracepoint__") else BPF.KPROBE
        programs[name.decode()] = bpf.load_func(name, kind).fd
        if not name.startswith(_NAMED_ATTACH):  # a uprobe program: also as uprobe_multi
            multi = _load_uprobe_multi(bpf, name, kind)
            if multi is not None:
                programs[name.decode() + UPROBE_MULTI_SUFFIX] = multi
    map_fds = {}
    for name in maps:
        fd = lib.bpf_table_fd(bpf.module, name.encode())
        if fd < 0:
            raise KernelSupportError(f"the BPF object has no map {name}")
        map_fds[name] = fd
    return bpf, programs, map_fds


def _load_uprobe_multi(bpf: Any, name: bytes, kind: int) -> int | None:
    """The same function loaded again for uprobe_multi links (Linux 6.6+): its fd, or None
    where the kernel refuses that attach type (the agent then uses a perf event per probe).
    BCC keeps one program per name: the copy is kept under another name, so that BCC's
    cleanup closes both."""
    first = bpf.funcs.pop(name)
    try:
        copy = bpf.load_func(name, kind, attach_type=BPF_TRACE_UPROBE_MULTI)
    except Exception:  # BCC raises bare Exception when the kernel refuses the program
        return None
    else:
        bpf.funcs[name + UPROBE_MULTI_SUFFIX.encode()] = bpf.funcs.pop(name)
        return int(copy.fd)
    finally:
        bpf.funcs[name] = first


def _helper_main(request_json: str, fd: int) -> int:
    request = json.loads(request_json)
    sock = socket.socket(fileno=fd)
    try:
        _bpf, programs, maps = _compile(
            [Path(s) for s in request["sources"]], request["cflags"], request["maps"]
        )
    except Exception as exc:  # reported to the agent, which raises KernelSupportError
        sock.send(json.dumps({"error": str(exc)}).encode())
        return 1
    reply = json.dumps({"programs": list(programs), "maps": list(maps)}).encode()
    socket.send_fds(sock, [reply], list(programs.values()) + list(maps.values()))
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1], int(sys.argv[2])))
