"""A binary that links a gRPC client but no gRPC server (the demo's user service is one) gets
its client probes: the DWARF walk, which skips the structs of servers a binary does not link,
keeps those of the clients it does. Real Go builds, no kernel needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from go_builds import TARGETS_DIR, build_go

from ebpf_apm.producer.client_probes import client_probes
from ebpf_apm.producer.elf_symbols import SymbolTable
from ebpf_apm.producer.go_binary import dwarf_struct_offsets, go_layout

GRPC_SERVER = "google.golang.org/grpc.(*Server).handleStream"
GRPC_INVOKE = "google.golang.org/grpc.invoke"


@pytest.mark.parametrize("stripped", [False, True], ids=["dwarf", "stripped"])
def test_a_grpc_client_without_a_server_gets_its_client_probe(
    tmp_path: Path, stripped: bool
) -> None:
    binary = build_go(TARGETS_DIR / "grpcdial", tmp_path / "grpcdial", "1.27", stripped,
                      gopath=True)  # fmt: skip
    table = SymbolTable.from_path(binary)
    assert GRPC_INVOKE in table and GRPC_SERVER not in table
    if not stripped:
        structs = dwarf_struct_offsets(binary) or {}
        assert "google.golang.org/grpc/internal/status.Error" in structs
    probes = client_probes(table, go_layout(binary))
    assert GRPC_INVOKE in {probe.symbol for probe in probes}
