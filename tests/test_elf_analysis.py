"""Binary analysis against real binaries: symbols, Go facts and probe sites (no BPF).

Every check runs on binaries built here by both Go toolchains (1.19 and 1.27), stripped
and not, plus the C target, because the point of this layer is to be right on the
binaries the agent will meet, not on hand-made fixtures. Independent readers (pyelftools
for .symtab, capstone for decoding) cross-check the producer's own parsers.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import capstone
import pytest
from capstone import x86_const as x86
from elftools.elf.elffile import ELFFile
from go_builds import TARGETS_DIR, build_go

from ebpf_apm.producer import elf_symbols
from ebpf_apm.producer.elf_symbols import FunctionSymbol, SymbolTable, function_bytes
from ebpf_apm.producer.errors import AgentError, SymbolNotFound, TargetError, UnsupportedBinary
from ebpf_apm.producer.go_binary import (
    FALLBACK_LAYOUTS,
    StructOffsets,
    clear_layout_cache,
    dwarf_struct_offsets,
    go_layout,
    go_minor,
    go_version,
    is_go_binary,
    table_layout,
)
from ebpf_apm.producer.probe_sites import go_entry_offset, plan_function, return_offsets

HANDLE_SLEEP = "main.(*server).handleSleep"
SERVE_HTTP = "net/http.serverHandler.ServeHTTP"
TOOLCHAINS = ["1.19", "1.27"]
VARIANTS = [(t, s) for t in TOOLCHAINS for s in (False, True)]
DWARF_BUDGET_S = 2.0

Targets = dict[tuple[str, bool], Path]


def _md() -> capstone.Cs:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return md


def _symtab_functions(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (address, size) of every STT_FUNC in .symtab, read by pyelftools."""
    with path.open("rb") as f:
        section = ELFFile(f).get_section_by_name(".symtab")
        assert section is not None, f"{path} has no .symtab"
        out: dict[str, tuple[int, int]] = {}
        for sym in section.iter_symbols():
            if sym["st_info"]["type"] == "STT_FUNC" and sym["st_shndx"] != "SHN_UNDEF":
                out.setdefault(sym.name, (sym["st_value"], sym["st_size"]))
        return out


@pytest.fixture(scope="module")
def go_pie_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """goserver as a position-independent executable (ET_DYN), unstripped, Go 1.27."""
    out = tmp_path_factory.mktemp("pie") / "goserver-pie"
    return build_go(TARGETS_DIR / "goserver", out, "1.27", False, pie=True)


# --- symbols ----------------------------------------------------------------------------


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
def test_symtab_reader_matches_pyelftools(go_targets: Targets, toolchain: str) -> None:
    path = go_targets[(toolchain, False)]
    table = SymbolTable.from_path(path)
    assert table.source == "symtab"
    reference = _symtab_functions(path)
    assert len(table) > 3000
    for sym in table:
        assert reference[sym.name] == (sym.address, sym.size), sym.name


@pytest.mark.parametrize(
    ("toolchain", "kind"), [("1.19", "exec"), ("1.27", "exec"), ("1.27", "pie")]
)
def test_pclntab_agrees_with_symtab_on_every_function(
    go_targets: Targets, request: pytest.FixtureRequest, toolchain: str, kind: str
) -> None:
    if kind == "pie":
        path: Path = request.getfixturevalue("go_pie_target")
    else:
        path = go_targets[(toolchain, False)]
    pcln = SymbolTable.from_path(path, source="gopclntab")
    assert pcln.source == "gopclntab"
    symtab = _symtab_functions(path)
    data = path.read_bytes()
    by_address = {address for address, _ in symtab.values()}
    matched = 0
    for sym in pcln:
        # Every function the Go table lists starts where some .symtab function starts...
        assert sym.address in by_address, sym.name
        # ...and under its own name (.symtab may suffix assembly functions with .abi0).
        twin = symtab.get(sym.name) or symtab.get(sym.name + ".abi0")
        if twin is None:
            continue  # e.g. Go 1.19 generic instances, all named "[...]" in .gopclntab
        address, size = twin
        assert sym.address == address, sym.name
        assert sym.size >= size, sym.name  # pclntab sizes run to the next function...
        padding = data[sym.file_offset + size : sym.file_offset + sym.size]
        if "." in sym.name:  # Go code (not cgo's C helpers, which gcc pads with NOPs)
            assert set(padding) <= {0xCC}, sym.name  # ...over INT3 padding only
        matched += 1
    assert matched >= 0.97 * len(pcln), (matched, len(pcln))
    # The other way round: every .symtab Go function the table names is at the same place.
    for name, (address, _) in symtab.items():
        plain = name.removesuffix(".abi0")
        if name in pcln:
            assert pcln.lookup(name).address == address, name
        elif plain in pcln and plain not in symtab:
            assert pcln.lookup(plain).address == address, name
    # textStart was resolved right (Go 1.27 leaves 0 in the header): main.main agrees.
    assert pcln.lookup("main.main").address == symtab["main.main"][0]
    assert pcln.lookup(HANDLE_SLEEP).address == symtab[HANDLE_SLEEP][0]


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
def test_stripped_binary_uses_pclntab(go_targets: Targets, toolchain: str) -> None:
    stripped = SymbolTable.from_path(go_targets[(toolchain, True)])
    unstripped = SymbolTable.from_path(go_targets[(toolchain, False)], source="gopclntab")
    assert stripped.source == "gopclntab"
    assert stripped.is_go
    for name in (HANDLE_SLEEP, SERVE_HTTP, "main.grow", "main.main"):
        sym = stripped.lookup(name)
        assert sym.name == name and sym.size > 0
        # -s -w drops only unloaded sections: the code is laid out identically.
        assert sym == unstripped.lookup(name)
    assert stripped.names() == unstripped.names()
    code = function_bytes(go_targets[(toolchain, True)], stripped.lookup(HANDLE_SLEEP))
    assert go_entry_offset(code) > 0


def test_c_binary_symbols(c_target: Path) -> None:
    table = SymbolTable.from_path(c_target)
    assert table.source == "symtab"
    assert not table.is_go
    assert not is_go_binary(c_target)
    assert go_version(c_target) is None
    compute = table.lookup("compute")
    assert compute.size > 0
    with c_target.open("rb") as f:
        assert ELFFile(f).header["e_type"] == "ET_DYN"  # gcc builds PIE by default
    plan = plan_function(c_target, table, "compute", is_go=False)
    assert plan.entry_offset == 0 and plan.return_offsets == [] and not plan.is_go
    with pytest.raises(UnsupportedBinary, match="not a Go binary"):
        go_layout(c_target)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: str(v))
def test_symbol_not_found_lists_close_matches(
    go_targets: Targets, variant: tuple[str, bool]
) -> None:
    table = SymbolTable.from_path(go_targets[variant])
    with pytest.raises(SymbolNotFound) as caught:
        table.lookup("main.(*server).handleSlep")
    err = caught.value
    assert err.symbol == "main.(*server).handleSlep"
    assert err.close_matches[0] == HANDLE_SLEEP
    assert len(err.close_matches) <= 5
    assert HANDLE_SLEEP in str(err) and "python -m ebpf_apm.producer.elf_symbols" in str(err)
    assert isinstance(err, TargetError) and isinstance(err, AgentError)
    assert err.exit_code == 2
    # A bare method name is completed to the full Go symbol.
    with pytest.raises(SymbolNotFound) as bare:
        table.lookup("handleSleep")
    assert bare.value.close_matches[0] == HANDLE_SLEEP


def test_symbol_listing_command(go_targets: Targets, capsys: pytest.CaptureFixture[str]) -> None:
    assert elf_symbols.main([str(go_targets[("1.27", True)]), "handleSleep"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.endswith(" " + HANDLE_SLEEP) for line in out), out
    assert all("handleSleep" in line for line in out)  # incl. the method value ...-fm
    assert elf_symbols.main(["/nonexistent/binary"]) == 2


def test_non_elf_file_is_unsupported(tmp_path: Path) -> None:
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\nexec ./server\n")
    with pytest.raises(UnsupportedBinary, match="not a valid ELF file") as caught:
        SymbolTable.from_path(script)
    assert "executable" in str(caught.value) and caught.value.exit_code == 2
    assert not is_go_binary(script)
    assert go_version(script) is None
    with pytest.raises(TargetError, match="cannot read binary") as missing:
        SymbolTable.from_path(tmp_path / "missing")
    assert not isinstance(missing.value, UnsupportedBinary)


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
def test_go_binary_without_pclntab_is_unsupported(
    go_targets: Targets, tmp_path: Path, toolchain: str
) -> None:
    objcopy = shutil.which("objcopy")
    assert objcopy, "objcopy (binutils) is needed for this test"
    damaged = tmp_path / "no-pclntab"
    subprocess.run(
        [objcopy, "--remove-section", ".gopclntab", str(go_targets[(toolchain, True)]), damaged],
        check=True,
        capture_output=True,
    )
    assert is_go_binary(damaged)
    with pytest.raises(UnsupportedBinary) as caught:
        SymbolTable.from_path(damaged)
    message = str(caught.value)
    assert "stripped Go binary without .gopclntab" in message
    assert str(damaged) in message and "-ldflags=-s" in message
    assert go_version(damaged) == go_version(go_targets[(toolchain, True)])


def test_non_x86_binary_is_unsupported(go_targets: Targets, tmp_path: Path) -> None:
    arm = tmp_path / "goserver-arm64"
    data = bytearray(go_targets[("1.27", False)].read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # e_machine = EM_AARCH64
    arm.write_bytes(bytes(data))
    table = SymbolTable.from_path(arm)
    with pytest.raises(UnsupportedBinary, match="x86-64 only"):
        plan_function(arm, table, HANDLE_SLEEP, is_go=True)


# --- Go facts ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: str(v))
def test_go_version(go_targets: Targets, variant: tuple[str, bool]) -> None:
    toolchain, _ = variant
    version = go_version(go_targets[variant])
    assert version is not None and version.startswith(f"go{toolchain}.")
    assert go_minor(version) == tuple(int(x) for x in toolchain.split("."))
    assert is_go_binary(go_targets[variant])


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
def test_layout_table_equals_dwarf(go_targets: Targets, toolchain: str) -> None:
    dwarf = go_layout(go_targets[(toolchain, False)])
    assert dwarf.source == "dwarf" and dwarf.note == ""
    assert dwarf.http_available
    measured = StructOffsets(
        goid_offset=dwarf.goid_offset,
        request_method=dwarf.request_method,
        request_url=dwarf.request_url,
        url_path=dwarf.url_path,
        response_status=dwarf.response_status,
    )
    assert FALLBACK_LAYOUTS[toolchain] == measured
    table = go_layout(go_targets[(toolchain, True)])
    assert table.source == "table" and "-ldflags=-w" in table.note
    assert (table.goid_offset, table.response_status) == (
        dwarf.goid_offset,
        dwarf.response_status,
    )
    assert table.version == dwarf.version


def test_dwarf_parse_is_fast_and_cached(go_targets: Targets) -> None:
    path = go_targets[("1.27", False)]
    clear_layout_cache()
    start = time.perf_counter()
    first = go_layout(path)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    second = go_layout(path)
    warm = time.perf_counter() - start
    assert first == second
    assert cold < DWARF_BUDGET_S, f"cold DWARF parse took {cold:.2f}s"
    assert warm < 0.05
    assert dwarf_struct_offsets(go_targets[("1.27", True)]) is None


def test_table_layout_versions() -> None:
    newer = table_layout("go1.31.2")
    assert newer.source == "table" and "Go 1.27" in newer.note and "nearest" in newer.note
    assert newer.response_status == FALLBACK_LAYOUTS["1.27"].response_status
    between = table_layout("go1.22.5")
    assert "Go 1.19" in between.note
    exact = table_layout("go1.19.13", has_http=False)
    assert "nearest" not in exact.note and not exact.http_available
    assert exact.goid_offset == FALLBACK_LAYOUTS["1.19"].goid_offset
    assert exact.response_status == -1
    with pytest.raises(UnsupportedBinary, match="register ABI"):
        table_layout("go1.16.15")
    with pytest.raises(UnsupportedBinary, match="table starts at Go 1.19"):
        table_layout("go1.18.10")


# --- probe sites ------------------------------------------------------------------------


def _code(path: Path, name: str) -> tuple[FunctionSymbol, bytes]:
    sym = SymbolTable.from_path(path).lookup(name)
    return sym, function_bytes(path, sym)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: str(v))
def test_return_offsets_are_rets(go_targets: Targets, variant: tuple[str, bool]) -> None:
    _, code = _code(go_targets[variant], HANDLE_SLEEP)
    offsets = return_offsets(code)
    assert len(offsets) >= 2  # handleSleep returns early on a bad status
    md = _md()
    for off in offsets:
        insn = next(md.disasm(code[off:], off, 1))
        assert insn.mnemonic == "ret", (off, insn.mnemonic)
    # No RET is missed: an independent sweep finds the same ones.
    assert offsets == [i.address for i in md.disasm(code, 0) if i.mnemonic == "ret"]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: str(v))
def test_go_entry_offset_skips_the_stack_check(
    go_targets: Targets, variant: tuple[str, bool]
) -> None:
    md = _md()
    for name in (HANDLE_SLEEP, "main.grow", SERVE_HTTP):
        _, code = _code(go_targets[variant], name)
        entry = go_entry_offset(code)
        assert entry > 0, name
        prologue = list(md.disasm(code[:entry], 0))
        assert sum(i.size for i in prologue) == entry, name  # lands on an instruction
        jump = prologue[-1]
        assert jump.mnemonic == "jbe", (name, jump.mnemonic)
        compare = prologue[-2]
        assert compare.mnemonic == "cmp" and compare.op_str.endswith("[r14 + 0x10]"), name
        # The jump goes to the morestack call, which restarts the function at offset 0.
        target = int(jump.operands[0].imm)
        block = list(md.disasm(code[target:], target))
        calls = [i for i in block if i.id == x86.X86_INS_CALL]
        jmp = next(i for i in block if i.id == x86.X86_INS_JMP)
        assert calls and calls[0].address < jmp.address and jmp.operands[0].imm == 0, name
    # main.grow's frame exceeds the small-frame limit: LEA R12, [RSP-N] form.
    _, grow = _code(go_targets[variant], "main.grow")
    first = next(md.disasm(grow, 0, 1))
    assert (first.mnemonic, first.op_str.split(",")[0]) == ("lea", "r12")


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
def test_every_prologue_shape_is_recognised(go_targets: Targets, toolchain: str) -> None:
    """Across main/net/http/runtime, each Go stack-check shape is found at least once."""
    path = go_targets[(toolchain, False)]
    table = SymbolTable.from_path(path)
    data = path.read_bytes()
    md = _md()
    shapes: dict[str, int] = {}
    for sym in table:
        if not sym.name.startswith(("main.", "net/http.", "runtime.")):
            continue
        code = data[sym.file_offset : sym.file_offset + sym.size]
        entry = go_entry_offset(code)
        if entry == 0:
            continue
        first = next(md.disasm(code, 0, 1))
        shape = f"{first.mnemonic} {first.op_str.split(',')[0]}"
        shapes[shape] = shapes.get(shape, 0) + 1
    assert shapes.get("cmp rsp", 0) > 100
    assert shapes.get("lea r12", 0) > 100
    assert shapes.get("mov r12", 0) >= 1  # huge frames: MOV R12, RSP; SUB; JB; CMP; JBE
    assert set(shapes) <= {"cmp rsp", "lea r12", "mov r12", "mov r14"}, shapes


def test_go_entry_offset_without_prologue() -> None:
    leaf = bytes.fromhex("48 c7 c0 01 00 00 00  c3")  # mov rax, 1; ret
    assert go_entry_offset(leaf) == 0
    assert return_offsets(leaf) == [7]
    # A stack check whose slow path never jumps back to 0 is not trusted.
    no_restart = bytes.fromhex("49 3b 66 10  76 01  c3  e8 00 00 00 00  c3")
    assert go_entry_offset(no_restart) == 0
    # The same check with a morestack block that restarts the function is.
    restart = bytes.fromhex("49 3b 66 10  76 01  c3  e8 00 00 00 00  eb f2")
    assert go_entry_offset(restart) == 6
    assert return_offsets(b"") == []


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
def test_plan_function_same_for_stripped(go_targets: Targets, toolchain: str) -> None:
    plans = []
    for stripped in (False, True):
        path = go_targets[(toolchain, stripped)]
        table = SymbolTable.from_path(path)
        plan = plan_function(path, table, HANDLE_SLEEP, is_go=True)
        assert plan.is_go and plan.entry_offset > 0 and plan.return_offsets
        assert plan.entry_file_offset == plan.symbol.file_offset + plan.entry_offset
        assert plan.return_file_offsets == [
            plan.symbol.file_offset + off for off in plan.return_offsets
        ]
        plans.append(plan)
    assert plans[0].entry_offset == plans[1].entry_offset
    assert plans[0].return_offsets == plans[1].return_offsets


def test_pie_file_offsets(go_pie_target: Path) -> None:
    table = SymbolTable.from_path(go_pie_target)
    with go_pie_target.open("rb") as f:
        elf = ELFFile(f)
        assert elf.header["e_type"] == "ET_DYN"
        text = elf.get_section_by_name(".text")
        assert text is not None
        sym = table.lookup(HANDLE_SLEEP)
        assert sym.file_offset == sym.address - text["sh_addr"] + text["sh_offset"]
    plan = plan_function(go_pie_target, table, HANDLE_SLEEP, is_go=True)
    assert plan.entry_offset > 0 and len(plan.return_offsets) >= 2
    assert go_layout(go_pie_target).source == "dwarf"
