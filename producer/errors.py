"""The agent's exception family, under ebpf_apm.errors.ApmError.

`ebpf_apm.cli.main` turns any of them into its message and exit status: 2 when the input was
wrong (`TargetError`: the user must change the command line or the target), 1 when the host
could not do the work (kernel or privileges). Messages say what failed, on what input, and
what to do next, because they are printed as-is.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from ebpf_apm.errors import ApmError, InputError

__all__ = [
    "AgentError",
    "BinaryLimitExceeded",
    "KernelSupportError",
    "PrivilegeError",
    "SymbolNotFound",
    "TargetError",
    "UnsupportedBinary",
]

#: How many near-miss names a SymbolNotFound message lists.
MAX_CLOSE_MATCHES = 5


class AgentError(ApmError):
    """Base of every error the agent reports (exit status 1)."""


class TargetError(AgentError, InputError):
    """The traced target is wrong: unknown pid, unreadable or non-ELF binary, bad symbol
    (exit status 2)."""


class UnsupportedBinary(TargetError):
    """The binary cannot be read or probed safely: "unsupported binary PATH: REASON".

    The one error every binary reader raises for a file it cannot use: a stripped Go binary
    without ``.gopclntab``, a non-x86-64 binary, a Go binary older than 1.17 (no register
    ABI), and any damaged or hostile file (an offset or size outside the file, a table that
    does not add up, a file over the size limit, a parse over the time limit).
    ``producer.binary_guard`` maps whatever else a parser raises on such a file to it.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"unsupported binary {self.path}: {reason}")


class BinaryLimitExceeded(UnsupportedBinary):
    """The binary is over the size limit, or reading it took longer than the time limit.

    Readers that treat an unreadable part as absent (no build info, not Go) must re-raise
    this one: the part was not found absent, the reader was stopped."""


class SymbolNotFound(TargetError):
    """A function name is not in the binary; carries near misses to help fix a typo."""

    def __init__(self, symbol: str, path: str | Path, candidates: Iterable[str]) -> None:
        self.symbol = symbol
        self.path = str(path)
        self.close_matches: list[str] = close_matches(symbol, candidates)
        message = f"function {symbol!r} not found in {self.path}"
        if self.close_matches:
            message += "; close matches: " + ", ".join(self.close_matches)
        else:
            message += "; no similar names"
        message += (
            ". List the binary's functions with `python -m ebpf_apm.producer.elf_symbols "
            f"{self.path} [SUBSTRING]`; Go methods are spelled like pkg.(*Type).Method"
        )
        super().__init__(message)


class KernelSupportError(AgentError):
    """The running kernel lacks something the probes need (uprobes, BPF features)."""


class PrivilegeError(AgentError):
    """The agent lacks the privileges (root / CAP_BPF, CAP_PERFMON) to load probes."""


def close_matches(symbol: str, candidates: Iterable[str]) -> list[str]:
    """Up to MAX_CLOSE_MATCHES names similar to ``symbol``, best first.

    Names whose last component equals the query come first, because users often type
    ``handleSleep`` for ``main.(*server).handleSleep``; difflib then catches typos.
    """
    names = list(candidates)
    found: list[str] = []
    for name in names:
        if name != symbol and name.endswith("." + symbol):
            found.append(name)
    found.sort(key=len)
    for name in difflib.get_close_matches(symbol, names, n=MAX_CLOSE_MATCHES, cutoff=0.6):
        if name not in found:
            found.append(name)
    return found[:MAX_CLOSE_MATCHES]
