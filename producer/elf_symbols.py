"""Function symbols of an ELF executable: where each function starts, in memory and on disk.

The agent attaches uprobes by file offset, so every symbol carries the file offset of its
entry as well as its virtual address. Symbols come from ``.symtab`` when the binary has
one. Go binaries built with ``-ldflags=-s`` have no ``.symtab``, but the Go runtime itself
needs the function table ``.gopclntab`` (for stack traces and GC), so it survives
stripping; this module parses it (Go 1.18+ formats) so stripped Go services can be traced.
C binaries without ``.symtab`` fall back to their exported ``.dynsym`` functions.

Run ``python -m ebpf_apm.producer.elf_symbols BINARY [SUBSTRING]`` to list a binary's functions.
"""

from __future__ import annotations

import argparse
import errno
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from elftools.elf.elffile import ELFFile

from ebpf_apm.producer.binary_guard import check_size, check_span, check_time, parsing
from ebpf_apm.producer.errors import SymbolNotFound, TargetError, UnsupportedBinary

__all__ = [
    "ElfImage",
    "FunctionSymbol",
    "LoadSegment",
    "SectionInfo",
    "SymbolSource",
    "SymbolTable",
    "function_bytes",
]

SymbolSource = Literal["symtab", "gopclntab", "dynsym"]

#: Section names that only the Go linker emits; any of them marks a Go binary.
GO_MARKER_SECTIONS = (
    ".go.buildinfo",
    ".gopclntab",
    ".data.rel.ro.gopclntab",
    ".note.go.buildid",
)
#: Where the Go linker puts the function table: plain, and in PIE binaries (read-only
#: after relocation).
PCLNTAB_SECTIONS = (".gopclntab", ".data.rel.ro.gopclntab")
#: pclntab magics: Go 1.18/1.19, and Go 1.20+ (same header, different funcdata encoding).
PCLNTAB_MAGIC_GO118 = 0xFFFFFFF0
PCLNTAB_MAGIC_GO120 = 0xFFFFFFF1
#: Older magics, recognised only to give a precise error.
PCLNTAB_MAGICS_OLD = {0xFFFFFFFA: "Go 1.16/1.17", 0xFFFFFFFB: "Go 1.2-1.15"}

STT_FUNC = 2
SHN_UNDEF = 0
#: Go's largest functions are tens of KB; a "function" of more is a damaged size field, and
#: disassembling it would cost seconds.
MAX_FUNCTION_BYTES = 1 << 20
#: How many table entries a loop handles between two checks of the parse time limit.
TIME_CHECK_EVERY = 4096
#: _func.flag bit for functions written in assembly (always ABI0).
FUNC_FLAG_ASM = 4


@dataclass(frozen=True)
class FunctionSymbol:
    """One function: ``address`` is the ELF virtual address, ``file_offset`` where its first
    byte is in the file (what a uprobe is attached to), ``size`` its length in bytes.

    Sizes from ``.gopclntab`` include the alignment padding up to the next function.
    """

    name: str
    address: int
    size: int
    file_offset: int


@dataclass(frozen=True)
class LoadSegment:
    """A PT_LOAD program header: maps [vaddr, vaddr+filesz) to [offset, offset+filesz)."""

    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int

    def contains(self, address: int) -> bool:
        """True if ``address`` is backed by file bytes in this segment."""
        return self.vaddr <= address < self.vaddr + self.filesz


@dataclass(frozen=True)
class SectionInfo:
    """The parts of a section header this package needs."""

    name: str
    address: int
    offset: int
    size: int
    sh_type: str
    link: int
    compressed: bool


class ElfImage:
    """Headers of an ELF executable, read once, plus byte access to its file.

    The file is reopened for each read so an ``ElfImage`` holds no descriptor and can be
    cached; callers that read a lot should use :meth:`reader` instead. Every read is
    checked against ``file_size`` first: header fields of a damaged file can point anywhere.
    """

    def __init__(self, path: Path, elf: ELFFile, file_size: int) -> None:
        self.path = path
        self.file_size = file_size
        self.machine: str = str(elf.header["e_machine"])
        self.elf_type: str = str(elf.header["e_type"])
        self.little_endian: bool = bool(elf.little_endian)
        self.elfclass: int = int(elf.elfclass)
        self.segments: tuple[LoadSegment, ...] = tuple(
            LoadSegment(
                vaddr=int(seg["p_vaddr"]),
                offset=int(seg["p_offset"]),
                filesz=int(seg["p_filesz"]),
                memsz=int(seg["p_memsz"]),
                flags=int(seg["p_flags"]),
            )
            for seg in elf.iter_segments()
            if seg["p_type"] == "PT_LOAD"
        )
        self.sections_by_index: list[SectionInfo] = []
        # A damaged header can claim 2**64 sections (extended numbering): the walk ends at
        # the end of the file, and the time limit bounds it before that.
        for index, sec in enumerate(elf.iter_sections()):
            if index % TIME_CHECK_EVERY == 0:
                check_time()
            self.sections_by_index.append(
                SectionInfo(
                    name=sec.name,
                    address=int(sec["sh_addr"]),
                    offset=int(sec["sh_offset"]),
                    size=int(sec["sh_size"]),
                    sh_type=str(sec["sh_type"]),
                    link=int(sec["sh_link"]),
                    compressed=bool(int(sec["sh_flags"]) & 0x800),  # SHF_COMPRESSED
                )
            )
        self.sections: dict[str, SectionInfo] = {}
        for info in self.sections_by_index:
            self.sections.setdefault(info.name, info)

    @classmethod
    def open(cls, path: str | Path) -> ElfImage:
        """Read the headers of ``path``; raise TargetError / UnsupportedBinary if unusable."""
        p = Path(path)
        with parsing(p):
            try:
                with p.open("rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    check_size(p, size)
                    if f.read(4) != b"\x7fELF":
                        raise UnsupportedBinary(
                            p,
                            "not a valid ELF file (no ELF magic); point the agent at the "
                            "service's executable, not a script, wrapper or archive",
                        )
                    f.seek(0)
                    return cls(p, ELFFile(f), size)
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # a seek to a negative offset a header gave
                    raise UnsupportedBinary(p, f"malformed file ({exc})") from exc
                raise TargetError(
                    f"cannot read binary {p}: {exc.strerror or exc}; check the path (or the "
                    "target pid) and that the agent runs with permission to read it"
                ) from exc

    @property
    def is_go(self) -> bool:
        """True if the Go linker produced this file (survives ``-s -w`` stripping)."""
        return any(name in self.sections for name in GO_MARKER_SECTIONS)

    def reader(self) -> BinaryIO:
        """A fresh binary file object on the image; the caller closes it."""
        return self.path.open("rb")

    def read(self, offset: int, size: int, what: str = "data") -> bytes:
        """``size`` bytes at file ``offset``; UnsupportedBinary if they are not all in the
        file, TargetError if the file shrank since it was opened."""
        check_span(self.path, what, offset, size, self.file_size)
        with self.reader() as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise TargetError(
                f"{self.path} is truncated: wanted {size} bytes at offset {offset:#x}, got "
                f"{len(data)}; was the binary replaced while being read?"
            )
        return data

    def section_data(self, name: str) -> bytes | None:
        """Raw bytes of an uncompressed, file-backed section, or None if there is none."""
        info = self.sections.get(name)
        if info is None or info.sh_type == "SHT_NOBITS" or info.compressed:
            return None
        return self.read(info.offset, info.size, f"section {name}")

    def segment_for(self, address: int) -> LoadSegment | None:
        """The PT_LOAD segment whose file bytes contain ``address``."""
        for seg in self.segments:
            if seg.contains(address):
                return seg
        return None

    def address_to_offset(self, address: int) -> int | None:
        """File offset of virtual ``address`` (addr - p_vaddr + p_offset), or None."""
        seg = self.segment_for(address)
        return None if seg is None else address - seg.vaddr + seg.offset

    def read_address(self, address: int, size: int) -> bytes | None:
        """``size`` bytes at virtual ``address`` if they are all file-backed, else None."""
        seg = self.segment_for(address)
        if seg is None or size < 0 or address + size > seg.vaddr + seg.filesz:
            return None
        return self.read(address - seg.vaddr + seg.offset, size, f"data at {address:#x}")


class SymbolTable:
    """Function symbols of one binary, by name.

    Built with :meth:`from_path`. ``source`` says where the names came from, which tells
    the caller how exact sizes are (pclntab sizes include padding).
    """

    def __init__(
        self,
        image: ElfImage,
        functions: Mapping[str, FunctionSymbol],
        source: SymbolSource,
    ) -> None:
        self.image = image
        self.path = image.path
        self._functions = dict(functions)
        self._source: SymbolSource = source

    @classmethod
    def from_path(cls, path: str | Path, source: SymbolSource | None = None) -> SymbolTable:
        """Read function symbols of the ELF executable at ``path``.

        Default order: ``.symtab``; for Go binaries whose ``.symtab`` is missing or holds
        no Go functions, ``.gopclntab``; for other binaries, ``.dynsym``. Pass ``source``
        to read exactly one of them (e.g. to check .gopclntab against .symtab).
        Every failure to read the file is an UnsupportedBinary (or a TargetError when the
        path cannot be opened at all).
        """
        with parsing(path):
            return cls._read(ElfImage.open(path), source)

    @classmethod
    def _read(cls, image: ElfImage, source: SymbolSource | None) -> SymbolTable:
        if image.elf_type not in ("ET_EXEC", "ET_DYN"):
            raise UnsupportedBinary(
                image.path,
                f"an ELF {image.elf_type} file, not an executable or shared object; uprobes "
                "need the linked program the service runs",
            )
        if source == "gopclntab":
            return cls(image, _read_pclntab(image), "gopclntab")
        if source is not None:
            functions = _read_elf_symbols(image, "." + source)
            if not functions:
                raise UnsupportedBinary(image.path, f"no functions in .{source}")
            return cls(image, functions, source)
        symtab = _read_elf_symbols(image, ".symtab")
        if image.is_go and not any(name.startswith("runtime.") for name in symtab):
            return cls(image, _read_pclntab(image), "gopclntab")
        if symtab:
            return cls(image, symtab, "symtab")
        dynsym = _read_elf_symbols(image, ".dynsym")
        if dynsym:
            return cls(image, dynsym, "dynsym")
        raise UnsupportedBinary(
            image.path,
            "no function symbols (no .symtab, no exported .dynsym functions); use an "
            "unstripped build of the binary",
        )

    @property
    def source(self) -> SymbolSource:
        """Where the symbols came from: "symtab", "gopclntab" or "dynsym"."""
        return self._source

    @property
    def machine(self) -> str:
        """The ELF e_machine, e.g. "EM_X86_64"."""
        return self.image.machine

    @property
    def is_go(self) -> bool:
        """True if the binary was produced by the Go linker."""
        return self.image.is_go

    def lookup(self, name: str) -> FunctionSymbol:
        """The function called ``name``; raise SymbolNotFound (with near misses) if absent."""
        try:
            return self._functions[name]
        except KeyError:
            raise SymbolNotFound(name, self.path, self._functions) from None

    def names(self) -> list[str]:
        """All function names, sorted."""
        return sorted(self._functions)

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __iter__(self) -> Iterator[FunctionSymbol]:
        return iter(self._functions.values())

    def __len__(self) -> int:
        return len(self._functions)


def function_bytes(path: str | Path, sym: FunctionSymbol) -> bytes:
    """The ``sym.size`` bytes of the function's code, read from the file at ``path``."""
    if not 0 <= sym.size <= MAX_FUNCTION_BYTES:
        raise UnsupportedBinary(
            path,
            f"function {sym.name} is {sym.size} bytes long, more than any real function "
            f"({MAX_FUNCTION_BYTES >> 20} MiB); its symbol is damaged",
        )
    try:
        with Path(path).open("rb") as f:
            f.seek(sym.file_offset)
            data = f.read(sym.size)
    except OSError as exc:
        raise TargetError(f"cannot read {sym.name} from {path}: {exc}") from exc
    if len(data) != sym.size:
        raise TargetError(
            f"{path} ends inside {sym.name} (offset {sym.file_offset:#x}, size {sym.size}); "
            "the binary changed since its symbols were read; read them again"
        )
    return data


def _symbol_dtype(image: ElfImage) -> np.dtype[np.void]:
    """numpy layout of one Elf32_Sym / Elf64_Sym in the file's byte order."""
    e = "<" if image.little_endian else ">"
    if image.elfclass == 64:
        return np.dtype(
            [
                ("name", e + "u4"),
                ("info", "u1"),
                ("other", "u1"),
                ("shndx", e + "u2"),
                ("value", e + "u8"),
                ("size", e + "u8"),
            ]
        )
    return np.dtype(
        [
            ("name", e + "u4"),
            ("value", e + "u4"),
            ("size", e + "u4"),
            ("info", "u1"),
            ("other", "u1"),
            ("shndx", e + "u2"),
        ]
    )


def _read_elf_symbols(image: ElfImage, section: str) -> dict[str, FunctionSymbol]:
    """Sized, defined STT_FUNC symbols of ``section`` (.symtab or .dynsym).

    numpy decodes the table in one go: Go binaries have tens of thousands of symbols and
    a per-symbol Python parser costs a noticeable fraction of a second.
    """
    info = image.sections.get(section)
    if info is None or info.sh_type not in ("SHT_SYMTAB", "SHT_DYNSYM"):
        return {}
    if not 0 <= info.link < len(image.sections_by_index):
        raise UnsupportedBinary(
            image.path, f"{section} links to string table {info.link}, which does not exist"
        )
    raw = image.section_data(section)
    strtab = image.section_data(image.sections_by_index[info.link].name)
    if raw is None or strtab is None:
        return {}
    dtype = _symbol_dtype(image)
    table = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
    wanted = table[
        ((table["info"] & 0xF) == STT_FUNC) & (table["size"] > 0) & (table["shndx"] != SHN_UNDEF)
    ]
    functions: dict[str, FunctionSymbol] = {}
    for i, (name_off, value, size) in enumerate(
        zip(wanted["name"].tolist(), wanted["value"].tolist(), wanted["size"].tolist(), strict=True)
    ):
        if i % TIME_CHECK_EVERY == 0:
            check_time()
        end = strtab.find(b"\0", name_off)
        name = strtab[name_off : end if end >= 0 else len(strtab)].decode("utf-8", "replace")
        offset = image.address_to_offset(value)
        if not name or offset is None or name in functions or offset + size > image.file_size:
            continue  # unnamed, not file-backed (or a damaged size), or a duplicate static name
        functions[name] = FunctionSymbol(name, value, size, offset)
    return functions


def _read_pclntab(image: ElfImage) -> dict[str, FunctionSymbol]:
    """Functions listed in the Go function table (Go 1.18+ layout).

    Header: magic u32, 2 pad bytes, minLC u8, ptrSize u8, then nfunc, nfiles, textStart,
    funcnameOffset, cuOffset, filetabOffset, pctabOffset, pclnOffset (ptrSize each). At
    pclnOffset, nfunc+1 (entryOff u32, funcOff u32) pairs; each _func (at pclnOffset +
    funcOff) starts with entryOff u32 and nameOff i32 into the name table.
    """
    data = None
    for name in PCLNTAB_SECTIONS:
        data = image.section_data(name)
        if data is not None:
            break
    if data is None:
        raise UnsupportedBinary(
            image.path,
            "a stripped Go binary without .gopclntab, so its function addresses are "
            "unknown; trace an unstripped build (without -ldflags=-s) or one that keeps "
            ".gopclntab",
        )
    e = "<" if image.little_endian else ">"
    if len(data) < 8:
        raise _corrupt(image, "the section is shorter than its header")
    magic = struct.unpack_from(e + "I", data, 0)[0]
    if magic in PCLNTAB_MAGICS_OLD:
        raise UnsupportedBinary(
            image.path,
            f"the {PCLNTAB_MAGICS_OLD[magic]} .gopclntab format; stripped binaries are "
            "supported from Go 1.18: trace an unstripped build or rebuild with a newer Go",
        )
    if magic not in (PCLNTAB_MAGIC_GO118, PCLNTAB_MAGIC_GO120):
        raise _corrupt(image, f"unknown magic {magic:#010x}")
    min_lc, ptr_size = data[6], data[7]
    if data[4:6] != b"\0\0" or min_lc not in (1, 2, 4) or ptr_size not in (4, 8):
        raise _corrupt(image, f"bad header (minLC {min_lc}, ptrSize {ptr_size})")
    word = e + ("Q" if ptr_size == 8 else "I")
    try:
        fields = struct.unpack_from(e + word[1] * 8, data, 8)
    except struct.error:
        raise _corrupt(image, "the section is shorter than its header") from None
    nfunc, _nfiles, text_start, funcname_off, _cu, _filetab, _pctab, pcln_off = fields
    if text_start == 0:
        # Builds whose textStart is filled by a relocation (external linking, PIE) leave 0
        # in the file; the table is relative to runtime.text, the start of .text.
        text = image.sections.get(".text")
        if text is None:
            raise _corrupt(image, "textStart is 0 and there is no .text section")
        text_start = text.address
    if pcln_off + 8 * (nfunc + 1) > len(data) or funcname_off >= len(data):
        raise _corrupt(image, f"function table ({nfunc} functions) runs past the section")
    functab = np.frombuffer(data, dtype=e + "u4", count=2 * (nfunc + 1), offset=pcln_off)
    entries = functab[0::2].astype(np.int64)
    if nfunc and bool(np.any(np.diff(entries) < 0)):
        raise _corrupt(image, "function entries are not sorted")
    flag_at = 37 if magic == PCLNTAB_MAGIC_GO118 else 41  # _func.flag; 1.20 added startLine
    entry_list = entries.tolist()
    func_offsets = functab[1::2].tolist()
    groups: dict[str, list[_PclnFunc]] = {}
    for i in range(nfunc):
        if i % TIME_CHECK_EVERY == 0:
            check_time()
        func_at = pcln_off + func_offsets[i]
        if func_at + flag_at >= len(data):
            raise _corrupt(image, f"_func {i} lies outside the section")
        entry_off, name_off = struct.unpack_from(e + "Ii", data, func_at)
        if entry_off != entry_list[i]:
            raise _corrupt(image, f"_func {i} disagrees with the function table")
        name_at = funcname_off + name_off
        end = data.find(b"\0", name_at)
        if not 0 <= name_at < len(data) or end < 0:
            raise _corrupt(image, f"name of function {i} lies outside the section")
        name = data[name_at:end].decode("utf-8", "replace")
        address = text_start + entry_off
        offset = image.address_to_offset(address)
        if offset is None:
            raise _corrupt(image, f"{name} at {address:#x} is outside every loaded segment")
        size = entry_list[i + 1] - entry_off
        if offset + size > image.file_size:
            raise _corrupt(image, f"{name} ({size} bytes at {address:#x}) runs past the file")
        if size > 0:
            is_asm = bool(data[func_at + flag_at] & FUNC_FLAG_ASM)
            groups.setdefault(name, []).append(
                _PclnFunc(FunctionSymbol(name, address, size, offset), is_asm)
            )
    functions: dict[str, FunctionSymbol] = {}
    for name, group in groups.items():
        for sym_name, sym in _name_duplicates(name, group):
            functions[sym_name] = replace(sym, name=sym_name)
    return functions


@dataclass(frozen=True)
class _PclnFunc:
    """A .gopclntab entry before its name is made unique."""

    symbol: FunctionSymbol
    is_asm: bool


def _name_duplicates(name: str, group: list[_PclnFunc]) -> list[tuple[str, FunctionSymbol]]:
    """Unique names for the functions that share ``name`` in .gopclntab, as .symtab has them.

    .gopclntab names an ABI0 function and its ABIInternal wrapper alike; .symtab calls the
    ABI0 one ``name.abi0``. Assembly functions are always ABI0, so when one of a pair is
    assembly it gets the suffix, otherwise the later one (the linker-made wrapper) does.
    Larger groups are generic instantiations (Go 1.19 prints them all as ``[...]``); only
    the first is kept, as it cannot be told apart from its siblings by name.
    """
    if len(group) == 1:
        return [(name, group[0].symbol)]
    if len(group) == 2 and "[" not in name:
        first, second = group
        if first.is_asm and not second.is_asm:
            return [(name + ".abi0", first.symbol), (name, second.symbol)]
        return [(name, first.symbol), (name + ".abi0", second.symbol)]
    return [(name, group[0].symbol)]


def _corrupt(image: ElfImage, detail: str) -> UnsupportedBinary:
    """The error for a .gopclntab this parser cannot trust."""
    return UnsupportedBinary(
        image.path,
        f"cannot parse .gopclntab: {detail}; the binary may be damaged or built by an "
        "unsupported Go version; trace an unstripped build instead",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the symbol listing (usable as an `ebpf-apm` subcommand)."""
    parser.add_argument("binary", help="ELF executable (or /proc/PID/exe)")
    parser.add_argument("substring", nargs="?", default="", help="only names containing this")


def run(args: argparse.Namespace) -> int:
    """List function names with address, file offset and size; the exit code is returned."""
    try:
        table = SymbolTable.from_path(args.binary)
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"# {len(table)} functions from {table.source}", file=sys.stderr)
    for name in table.names():
        if args.substring in name:
            sym = table.lookup(name)
            print(f"{sym.address:#014x} {sym.file_offset:#010x} {sym.size:8d} {name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ebpf_apm.producer.elf_symbols BINARY [SUBSTRING]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ebpf_apm.producer.elf_symbols", description="List an ELF file's functions."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
