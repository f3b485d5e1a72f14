"""The numpy layouts in producer/event_layout.py match bpf/events.h as a C compiler sees it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from producer import event_layout

ROOT = Path(__file__).resolve().parent.parent


def _c_offsets(tmp_path: Path) -> dict[str, int]:
    lines = []
    for struct, fields in event_layout.C_FIELDS.items():
        lines.append(f'printf("{struct} sizeof %zu\\n", sizeof(struct {struct}));')
        for c_name in fields:
            lines.append(
                f'printf("{struct} {c_name} %zu\\n", offsetof(struct {struct}, {c_name}));'
            )
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/types.h>\n"
        '#include "events.h"\nint main(void) {\n' + "\n".join(lines) + "\nreturn 0;\n}\n"
    )
    binary = tmp_path / "layout"
    subprocess.run(["gcc", "-I", str(ROOT / "bpf"), "-o", str(binary), str(source)], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        struct, name, value = line.split()
        result[f"{struct} {name}"] = int(value)
    return result


def test_numpy_layouts_match_the_c_header(tmp_path: Path) -> None:
    c = _c_offsets(tmp_path)
    dtypes = {
        "span_event": event_layout.SPAN_EVENT,
        "http_span_event": event_layout.HTTP_SPAN_EVENT,
        "net_event": event_layout.NET_EVENT,
    }
    for struct, fields in event_layout.C_FIELDS.items():
        dtype = dtypes[struct]
        assert c[f"{struct} sizeof"] == dtype.itemsize, struct
        for c_name, np_name in fields.items():
            assert c[f"{struct} {c_name}"] == dtype.fields[np_name][1], f"{struct}.{c_name}"


def test_header_constants_match() -> None:
    header = (ROOT / "bpf" / "events.h").read_text()
    for name in (
        "EVENT_KIND_SPAN",
        "EVENT_KIND_HTTP_SPAN",
        "EVENT_KIND_NET",
        "NET_SEND",
        "NET_RECV",
        "HTTP_METHOD_MAX",
        "HTTP_PATH_MAX",
    ):
        value = getattr(event_layout, name)
        assert f"#define {name} {value}" in header, name
