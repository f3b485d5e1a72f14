"""Where, inside a function, the agent puts its uprobes (x86-64).

Go functions cannot use uretprobes: the kernel replaces the return address on the stack,
and the Go runtime copies goroutine stacks when they grow and walks them for tracebacks,
which crashes or mis-times the program. So the agent instead puts a uprobe on every RET
instruction, found here by disassembling the function.

The entry probe also needs care. A Go function begins with a stack-bound check; when the
goroutine's stack is too small it jumps to a block that calls runtime.morestack and then
jumps back to the function's first instruction. A uprobe at offset 0 therefore fires
twice for one call whenever the stack grows. :func:`go_entry_offset` finds the first
instruction after that check, which runs exactly once per call and where the argument
registers still hold the arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import capstone
from capstone import x86_const as x86

from ebpf_apm.producer.binary_guard import check_time, parsing
from ebpf_apm.producer.elf_symbols import (
    TIME_CHECK_EVERY,
    FunctionSymbol,
    SymbolTable,
    function_bytes,
)
from ebpf_apm.producer.errors import UnsupportedBinary

__all__ = ["ProbePlan", "go_entry_offset", "plan_function", "return_offsets"]

#: Offset of g.stackguard0 in runtime.g: the word every Go stack check compares against.
STACKGUARD0_OFFSET = 0x10
#: How many instructions a Go prologue's stack check can span (MOV R14 from TLS, then
#: MOV, SUB, JB, CMP, JBE).
MAX_PROLOGUE_INSNS = 6

_RET_IDS = frozenset({x86.X86_INS_RET})
_JBE_IDS = frozenset({x86.X86_INS_JBE})  # JBE == JNA == Go's JLS
_JB_IDS = frozenset({x86.X86_INS_JB})  # JB == JC == Go's JCS


@dataclass(frozen=True)
class ProbePlan:
    """Probe sites for one function, as offsets from its first byte.

    ``entry_offset`` is where the entry uprobe goes (0 for non-Go functions and Go
    functions without a stack check); ``return_offsets`` lists every RET of a Go function.
    For non-Go functions it is empty: the agent uses a uretprobe there, which is safe on
    C stacks and also catches returns through tail calls that a RET scan would miss.
    An empty list for a Go function means it never returns with RET (it panics, exits
    or tail-calls), so it cannot be timed.
    """

    symbol: FunctionSymbol
    entry_offset: int
    return_offsets: list[int] = field(default_factory=list)
    is_go: bool = True

    @property
    def entry_file_offset(self) -> int:
        """File offset of the entry probe (what uprobe_events / perf_event_open take)."""
        return self.symbol.file_offset + self.entry_offset

    @property
    def return_file_offsets(self) -> list[int]:
        """File offsets of the return probes."""
        return [self.symbol.file_offset + off for off in self.return_offsets]


@lru_cache(maxsize=2)
def _disassembler(detail: bool) -> capstone.Cs:
    """A shared x86-64 capstone handle; ``detail`` is needed to inspect operands."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = detail
    md.skipdata = True  # keep sweeping past bytes capstone cannot decode
    return md


def return_offsets(code: bytes) -> list[int]:
    """Offsets of every RET instruction in ``code`` (one function), by linear sweep.

    Go emits no data inside functions, so a linear sweep decodes exactly the real
    instructions; the INT3 padding after the last one decodes harmlessly.
    """
    found = []
    for count, insn in enumerate(_disassembler(False).disasm(code, 0)):
        if count % TIME_CHECK_EVERY == 0:
            check_time()  # a damaged size can make "one function" the whole text segment
        if insn.id in _RET_IDS:
            found.append(insn.address)
    return found


def go_entry_offset(code: bytes) -> int:
    """Offset right after a Go function's stack-bound check, or 0 if it has none.

    Recognised prologues (R14 holds the current g with the register ABI):

    * ``CMP RSP, [R14+0x10]; JBE more`` (small frames),
    * ``LEA R12, [RSP-N]; CMP R12, [R14+0x10]; JBE more`` (frames above 128 bytes),
    * ``MOV R12, RSP; SUB R12, N; JB more; CMP R12, [R14+0x10]; JBE more`` (huge frames),

    where ``more`` is a block at the function's end that calls runtime.morestack and
    jumps back to offset 0. ABI0 wrappers first load g with ``MOV R14, FS:[-8]``.
    Anything else (NOSPLIT or assembly functions) gives 0.
    """
    insns = list(_disassembler(True).disasm(code[:64], 0, MAX_PROLOGUE_INSNS))
    if insns and _loads_g_from_tls(insns[0]):
        insns = insns[1:]
    for i, insn in enumerate(insns):
        if insn.id != x86.X86_INS_CMP or not _is_stack_guard_compare(insn):
            continue
        temp = insn.operands[0].reg
        if not _prefix_computes(insns[:i], temp):
            return 0
        if i + 1 >= len(insns) or insns[i + 1].id not in _JBE_IDS:
            return 0
        jump = insns[i + 1]
        if not _jumps_to_morestack_block(code, jump):
            return 0
        if any(not _jumps_to_morestack_block(code, j) for j in insns[:i] if j.id in _JB_IDS):
            return 0
        return int(jump.address + jump.size)
    return 0


def plan_function(path: str | Path, table: SymbolTable, name: str, is_go: bool) -> ProbePlan:
    """Probe sites for function ``name`` of the binary at ``path`` (symbols in ``table``)."""
    if table.machine != "EM_X86_64":
        raise UnsupportedBinary(
            path,
            f"built for {table.machine.removeprefix('EM_')}, but probe placement is "
            "implemented for x86-64 only; trace an amd64 build of the service",
        )
    symbol = table.lookup(name)
    if not is_go:
        return ProbePlan(symbol=symbol, entry_offset=0, return_offsets=[], is_go=False)
    with parsing(path):  # capstone on damaged bytes: any error means "unsupported"
        code = function_bytes(path, symbol)
        return ProbePlan(
        symbol=symbol,
            entry_offset=go_entry_offset(code),
            return_offsets=return_offsets(code),
            is_go=True,
        )


def _is_stack_guard_compare(insn: capstone.CsInsn) -> bool:
    """True for ``CMP reg, qword ptr [R14 + 0x10]`` (reg is RSP or a temporary)."""
    if len(insn.operands) != 2:
        return False
    reg, mem = insn.operands
    return bool(
        reg.type == x86.X86_OP_REG
        and mem.type == x86.X86_OP_MEM
        and mem.mem.base == x86.X86_REG_R14
        and mem.mem.index == x86.X86_REG_INVALID
        and mem.mem.disp == STACKGUARD0_OFFSET
        and mem.mem.segment == x86.X86_REG_INVALID
    )


def _loads_g_from_tls(insn: capstone.CsInsn) -> bool:
    """True for ``MOV R14, qword ptr FS:[-8]``: an ABI0 wrapper fetching the current g."""
    if insn.id != x86.X86_INS_MOV or len(insn.operands) != 2:
        return False
    dst, src = insn.operands
    return bool(
        dst.type == x86.X86_OP_REG
        and dst.reg == x86.X86_REG_R14
        and src.type == x86.X86_OP_MEM
        and src.mem.segment == x86.X86_REG_FS
    )


def _prefix_computes(prefix: list[capstone.CsInsn], temp: int) -> bool:
    """True if the instructions before the compare are a known way of computing ``temp``.

    RSP itself needs none; a temporary must be LEA temp, [RSP-N], or MOV temp, RSP;
    SUB temp, N; JB more. Anything else is not a Go prologue.
    """
    shapes = [insn.id for insn in prefix]
    if temp == x86.X86_REG_RSP:
        return not prefix
    if shapes == [x86.X86_INS_LEA]:
        dst, src = prefix[0].operands
        return bool(
            dst.type == x86.X86_OP_REG
            and dst.reg == temp
            and src.type == x86.X86_OP_MEM
            and src.mem.base == x86.X86_REG_RSP
            and src.mem.index == x86.X86_REG_INVALID
        )
    if shapes == [x86.X86_INS_MOV, x86.X86_INS_SUB, x86.X86_INS_JB]:
        mov, sub = prefix[0], prefix[1]
        return bool(
            mov.operands[0].type == x86.X86_OP_REG
            and mov.operands[0].reg == temp
            and mov.operands[1].type == x86.X86_OP_REG
            and mov.operands[1].reg == x86.X86_REG_RSP
            and sub.operands[0].type == x86.X86_OP_REG
            and sub.operands[0].reg == temp
            and sub.operands[1].type == x86.X86_OP_IMM
        )
    return False


def _jumps_to_morestack_block(code: bytes, jump: capstone.CsInsn) -> bool:
    """True if ``jump`` goes forward to a block whose first JMP goes back to offset 0.

    That block spills the argument registers, calls runtime.morestack, reloads them and
    restarts the function; checking the JMP back proves the prologue is what we think.
    """
    target_op = jump.operands[0]
    if target_op.type != x86.X86_OP_IMM:
        return False
    target = int(target_op.imm)
    if not jump.address < target < len(code):
        return False
    for insn in _disassembler(True).disasm(code[target:], target):
        if insn.id in (x86.X86_INS_RET, x86.X86_INS_INT3):
            return False
        if insn.id == x86.X86_INS_JMP:
            op = insn.operands[0]
            return bool(op.type == x86.X86_OP_IMM and op.imm == 0)
    return False
