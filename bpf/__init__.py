"""The BPF C sources, shipped as package data (`ebpf_apm.bpf`).

The agent compiles them with BCC on the node it runs on; this package only says where they
are, so an installed wheel finds them as well as a source checkout does.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def source_dir() -> Path:
    """The folder holding the `.bpf.c` programs and their headers (a real directory: BCC
    compiles from files and takes `-I` include paths)."""
    path = Path(str(resources.files(__name__)))
    if not (path / "events.h").is_file():  # a zip import has no real folder to give BCC
        raise FileNotFoundError(f"the BPF sources are not installed as files under {path}")
    return path
