"""The agent's mirrors of the kernel/user contract match the C headers as a compiler sees them.

Every header under bpf/ that both sides share is compiled into a small program that prints
each mirrored struct's size, each field's offset and each constant; the Python mirrors
(event_layout, map_layout, process_discovery) must agree to the byte. A reordered counter
or a field added on one side only fails here, not as mislabelled figures in production.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from ebpf_apm import bpf
from ebpf_apm.producer import event_layout, map_layout, process_discovery

BPF_DIR = bpf.source_dir()

# header -> ({struct: (mirror dtype, {C field: mirror field})}, {constant: mirror value})
Structs = dict[str, tuple[np.dtype, dict[str, str]]]


def _own_fields(dtype: np.dtype) -> dict[str, str]:
    """C field name = mirror field name, padding left out."""
    assert dtype.names is not None
    return {name: name for name in dtype.names if not name.startswith("_")}


CONTRACTS: dict[str, tuple[Structs, dict[str, int]]] = {
    "events.h": (
        {
            "span_event": (event_layout.SPAN_EVENT, event_layout.C_FIELDS["span_event"]),
            "http_span_event": (
                event_layout.HTTP_SPAN_EVENT,
                event_layout.C_FIELDS["http_span_event"],
            ),
            "net_event": (event_layout.NET_EVENT, event_layout.C_FIELDS["net_event"]),
            "client_span_event": (
                event_layout.CLIENT_SPAN_EVENT,
                event_layout.C_FIELDS["client_span_event"],
            ),
        },
        {
            "EVENT_KIND_SPAN": event_layout.EVENT_KIND_SPAN,
            "EVENT_KIND_HTTP_SPAN": event_layout.EVENT_KIND_HTTP_SPAN,
            "EVENT_KIND_NET": event_layout.EVENT_KIND_NET,
            "NET_SEND": event_layout.NET_SEND,
            "NET_RECV": event_layout.NET_RECV,
            "HTTP_METHOD_MAX": event_layout.HTTP_METHOD_MAX,
            "HTTP_PATH_MAX": event_layout.HTTP_PATH_MAX,
            "PROTO_HTTP": event_layout.PROTO_HTTP,
            "PROTO_HTTP1": event_layout.PROTO_HTTP1,
            "PROTO_HTTP2": event_layout.PROTO_HTTP2,
            "PROTO_GRPC": event_layout.PROTO_GRPC,
            "STATUS_UNKNOWN": event_layout.STATUS_UNKNOWN,
            "EVENT_KIND_CLIENT_SPAN": event_layout.EVENT_KIND_CLIENT_SPAN,
            "CLIENT_HTTP": event_layout.CLIENT_HTTP,
            "CLIENT_GRPC": event_layout.CLIENT_GRPC,
            "CLIENT_SQL": event_layout.CLIENT_SQL,
            "CLIENT_HOST_MAX": event_layout.CLIENT_HOST_MAX,
            "CLIENT_TEXT_MAX": event_layout.CLIENT_TEXT_MAX,
            "DB_SYSTEM_POSTGRESQL": event_layout.DB_SYSTEMS.index("postgresql"),
            "DB_SYSTEM_MYSQL": event_layout.DB_SYSTEMS.index("mysql"),
            "DB_SYSTEM_SQLITE": event_layout.DB_SYSTEMS.index("sqlite"),
            "DB_SYSTEM_MSSQL": event_layout.DB_SYSTEMS.index("mssql"),
        },
    ),
    "probe_maps.h": (
        {name: (dtype, _own_fields(dtype)) for name, dtype in map_layout.STRUCTS.items()},
        map_layout.CONSTANTS,
    ),
    "process_events.h": (
        {
            "process_event": (
                process_discovery.PROCESS_EVENT,
                process_discovery.C_FIELDS["process_event"],
            )
        },
        {
            "EVENT_KIND_PROCESS_EXEC": process_discovery.EVENT_KIND_PROCESS_EXEC,
            "EVENT_KIND_PROCESS_EXIT": process_discovery.EVENT_KIND_PROCESS_EXIT,
            "PROCESS_COUNTER_RING_FULL": process_discovery.PROCESS_COUNTERS["ring_full"],
            "PROCESS_COUNTER_EMITTED": process_discovery.PROCESS_COUNTERS["emitted"],
            "PROCESS_COUNTER_SLOTS": len(process_discovery.PROCESS_COUNTERS),
        },
    ),
}


def compiled_view(header: str, structs: Structs, constants: list[str], tmp: Path) -> dict:
    """Sizes, offsets and constants as gcc lays out `header`."""
    lines = []
    for struct, (_, fields) in structs.items():
        lines.append(f'printf("{struct} sizeof %zu\\n", sizeof(struct {struct}));')
        for c_name in fields:
            lines.append(
                f'printf("{struct} {c_name} %zu\\n", offsetof(struct {struct}, {c_name}));'
            )
    for name in constants:
        lines.append(f'printf("#define {name} %lld\\n", (long long)({name}));')
    source = tmp / "layout.c"
    source.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/types.h>\n"
        f'#include "{header}"\nint main(void) {{\n' + "\n".join(lines) + "\nreturn 0;\n}\n"
    )
    binary = tmp / "layout"
    subprocess.run(["gcc", "-I", str(BPF_DIR), "-o", str(binary), str(source)], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.rsplit(" ", 1) for line in out.splitlines())}


@pytest.mark.parametrize("header", sorted(CONTRACTS))
def test_mirrors_match_the_compiled_header(header: str, tmp_path: Path) -> None:
    structs, constants = CONTRACTS[header]
    c = compiled_view(header, structs, list(constants), tmp_path)
    for struct, (dtype, fields) in structs.items():
        assert dtype.fields is not None
        assert c[f"{struct} sizeof"] == dtype.itemsize, f"sizeof(struct {struct})"
        for c_name, np_name in fields.items():
            assert c[f"{struct} {c_name}"] == dtype.fields[np_name][1], f"{struct}.{c_name}"
    for name, value in constants.items():
        assert c[f"#define {name}"] == value, name


def test_every_struct_and_constant_of_the_map_header_is_mirrored() -> None:
    """A struct or #define added to probe_maps.h without a mirror fails here."""
    text = (BPF_DIR / "probe_maps.h").read_text()
    structs = {line.split()[1] for line in text.splitlines() if line.startswith("struct ")}
    defines = {
        line.split()[1]
        for line in text.splitlines()
        if line.startswith("#define ") and not line.startswith("#define EBPF_APM_")
    }
    assert structs == set(map_layout.STRUCTS)
    assert defines == set(map_layout.CONSTANTS)


def test_counter_names_cover_every_slot_once() -> None:
    assert sorted(map_layout.COUNTERS.values()) == list(range(map_layout.COUNTER_SLOTS))
    assert sorted(process_discovery.PROCESS_COUNTERS.values()) == list(
        range(len(process_discovery.PROCESS_COUNTERS))
    )
