"""Struct member offsets that the server and client probes read (producer/server_probes.py,
producer/client_probes.py): DWARF's where the binary has it, else tables measured per Go
release and library version, for stripped builds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from ebpf_apm.producer.go_binary import GoLayout, go_minor

log = logging.getLogger(__name__)

Member = tuple[str, str]  # (struct, member) as DWARF names them


def member_offsets(
    layout: GoLayout,
    go_table: Mapping[str, Mapping[Member, int]],
    library_table: Mapping[Member, int],
) -> Callable[[str, str], int]:
    """Offset of a struct member (-1 unknown): DWARF's, or for a stripped build the row of
    `go_table` of the newest Go release at or below the binary's, then `library_table`."""
    go_row: Mapping[Member, int] = {}
    minor = go_minor(layout.version)
    if layout.source == "table" and minor is not None:
        known = sorted((m, key) for key in go_table if (m := go_minor("go" + key)))
        lower = [key for m, key in known if m <= minor]
        if lower:
            go_row = go_table[lower[-1]]

    def offset(struct_name: str, member: str) -> int:
        if layout.source == "dwarf":
            found = layout.dwarf_offset(struct_name, member)
            return -1 if found is None else found
        return go_row.get((struct_name, member), library_table.get((struct_name, member), -1))

    return offset


def offsets_missing(
    symbol: str, wanted: list[Member], fields: list[int], layout: GoLayout, traced: str
) -> bool:
    """Whether an offset of `wanted` is unknown (-1 in `fields`); if so, say that `traced`
    ("calls", "requests") of `symbol` are not traced, and what to do."""
    unknown = [f"{s}.{m}" for (s, m), value in zip(wanted, fields, strict=True) if value < 0]
    if unknown:
        log.warning(
            "%s is linked but the offsets of %s are unknown for %s (%s): its %s are not "
            "traced; trace a build with DWARF (without -ldflags=-w)",
            symbol,
            ", ".join(unknown),
            layout.version,
            "no DWARF" if layout.source == "table" else "not in DWARF",
            traced,
        )
        return True
    return False
