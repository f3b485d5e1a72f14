"""The one exception base of ebpf-apm.

Every error a command reports to its user derives from :class:`ApmError`; each package has
its family under it (`AgentError`, `KafkaEdgeError`, `ConsumerError`). `ebpf_apm.cli.main`
catches the base once, prints the message as it is and exits with `exit_code`: 1 when the
host or a server could not do the work, 2 (`InputError`) when the user must change a flag,
a file or a target. Messages say what failed, on what input, and what to do next.
"""

from __future__ import annotations


class ApmError(Exception):
    """A failure a command reports and exits on; exit status 1 (runtime)."""

    exit_code: int = 1


class InputError(ApmError):
    """The input was wrong (a flag, a file, a target, a topic layout); exit status 2.

    Package errors that are about input derive from their family and from this class."""

    exit_code = 2
