"""Limits for reading target binaries, and the one error every failure becomes.

A target binary is input the agent does not control: a damaged or hostile file can hold any
offset, size or count. The readers (elf_symbols, go_binary, probe_sites) check every offset
and size against the file before reading; this module supplies what they check against and
catches what still slips through:

* `parsing(path, limits)` guards one parse: files over `max_bytes` are refused before any
  table is read, `check_time()` (called in every loop whose length the file decides) stops
  a parse that outlives `time_limit_s`, and any exception a parser or library raises on a
  malformed file (ValueError, struct.error, ELFError, MemoryError, ...) becomes
  `UnsupportedBinary(path, reason)`, the original chained for debugging.
* Guards nest: the outermost one sets the limits and the deadline, inner ones (a reader
  calling another) only map errors. Outside any guard a reader runs under default limits.

The limits are per thread, so a parse in a worker thread and one on the event loop each
keep their own.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import DWARFError, ELFError

from ebpf_apm.producer.errors import BinaryLimitExceeded, TargetError, UnsupportedBinary

__all__ = ["BinaryLimits", "check_size", "check_span", "check_time", "parsing"]

log = logging.getLogger(__name__)

#: Go services are tens of MB (the largest common ones, kubelet-sized, a few hundred).
DEFAULT_MAX_BYTES = 1 << 30
#: Our 9 MB test server parses in well under a second on this small VM.
DEFAULT_TIME_LIMIT_S = 20.0

#: What parsers raise on bytes that do not add up; all mean "this file is malformed".
#: TypeError/AttributeError/IndexError come from pyelftools building structures out of
#: nonsense (a None where a table was expected), RecursionError from cyclic DWARF, zlib.error
#: from a damaged compressed debug section (Go compresses DWARF).
MALFORMED_ERRORS: tuple[type[BaseException], ...] = (
    ELFError,
    DWARFError,
    zlib.error,
    struct.error,
    ValueError,
    KeyError,
    IndexError,
    OverflowError,
    MemoryError,
    EOFError,
    TypeError,
    AttributeError,
    AssertionError,
    RecursionError,
)


@dataclass(frozen=True)
class BinaryLimits:
    """How much of one binary the agent is willing to read: ``max_bytes`` of file, for at
    most ``time_limit_s`` seconds of parsing."""

    max_bytes: int = DEFAULT_MAX_BYTES
    time_limit_s: float = DEFAULT_TIME_LIMIT_S


@dataclass(frozen=True)
class _Parse:
    path: str
    limits: BinaryLimits
    deadline: float


_state = threading.local()


def _current() -> _Parse | None:
    parse: _Parse | None = getattr(_state, "parse", None)
    return parse


@contextmanager
def parsing(path: str | Path, limits: BinaryLimits | None = None) -> Iterator[BinaryLimits]:
    """Guard the parse of ``path`` (see the module doc); yields the limits in force."""
    outer = _current()
    if outer is None:
        limits = limits or BinaryLimits()
        _state.parse = _Parse(str(path), limits, time.monotonic() + limits.time_limit_s)
    else:
        limits = outer.limits
    try:
        yield limits
    except TargetError:
        raise  # already says what is wrong (UnsupportedBinary, or an unreadable path)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise  # the file could not be read: the caller says what to check
        raise UnsupportedBinary(path, f"malformed file (a seek to a bad offset: {exc})") from exc
    except MALFORMED_ERRORS as exc:
        log.debug("parsing %s failed", path, exc_info=True)
        detail = str(exc) or "no detail"
        raise UnsupportedBinary(
            path, f"malformed file ({type(exc).__name__}: {detail[:200]})"
        ) from exc
    finally:
        if outer is None:
            _state.parse = None


def check_time() -> None:
    """Raise UnsupportedBinary if the guarded parse has run past its time limit."""
    parse = _current()
    if parse is not None and time.monotonic() > parse.deadline:
        raise BinaryLimitExceeded(
            parse.path,
            f"parse time limit ({parse.limits.time_limit_s:g} s) exceeded; raise "
            "--binary-parse-seconds if this really is a service binary",
        )


def check_size(path: str | Path, size: int) -> None:
    """Raise UnsupportedBinary if a file of ``size`` bytes is over the size limit."""
    parse = _current()
    limit = parse.limits.max_bytes if parse is not None else DEFAULT_MAX_BYTES
    if size > limit:
        raise BinaryLimitExceeded(
            path,
            f"{size} bytes, more than the {limit >> 20} MiB limit; raise --max-binary-mib "
            "if this really is a service binary",
        )


def check_span(path: str | Path, what: str, offset: int, size: int, file_size: int) -> None:
    """Raise UnsupportedBinary unless [offset, offset+size) lies inside the file."""
    if offset < 0 or size < 0 or offset + size > file_size:
        raise UnsupportedBinary(
            path,
            f"{what} (offset {offset:#x}, {size} bytes) lies outside the file "
            f"({file_size} bytes); the file is damaged or truncated",
        )
