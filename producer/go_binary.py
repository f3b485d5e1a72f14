"""Go-specific facts about a binary: its Go version and the struct offsets the probes read.

The BPF programs read a few fields straight out of Go memory: the goroutine id (to pair a
function's entry with its return when goroutines migrate between threads), the request's
method and URL path, and the response status. Their offsets change between Go releases,
so they come from the binary's own DWARF when it has any, and otherwise (``-ldflags=-w``)
from a table measured here from DWARF of binaries built by each supported toolchain
(``tests/test_elf_analysis.py`` keeps the table and DWARF in step).
"""

from __future__ import annotations

import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from elftools.dwarf.compileunit import CompileUnit
from elftools.dwarf.die import DIE
from elftools.elf.elffile import ELFFile

from ebpf_apm.producer.binary_guard import check_span, check_time, parsing
from ebpf_apm.producer.elf_symbols import ElfImage, SymbolTable
from ebpf_apm.producer.errors import BinaryLimitExceeded, TargetError, UnsupportedBinary

__all__ = [
    "FALLBACK_LAYOUTS",
    "clear_layout_cache",
    "dwarf_struct_offsets",
    "GoLayout",
    "LayoutSource",
    "StructOffsets",
    "go_layout",
    "go_minor",
    "go_version",
    "is_go_binary",
    "table_layout",
]

LayoutSource = Literal["dwarf", "table"]

BUILDINFO_MAGIC = b"\xff Go buildinf:"
BUILDINFO_HEADER_SIZE = 32
BUILDINFO_FLAG_BIG_ENDIAN = 1
BUILDINFO_FLAG_INLINE_STRINGS = 2
#: The register ABI (arguments in RAX, RBX, ...) exists on amd64 from Go 1.17.
MIN_GO = (1, 17)
#: Present in every Go HTTP/1 server; without it net/http.response is not used.
HTTP_SERVER_FUNCTION = "net/http.(*conn).serve"

#: DWARF struct name -> the members whose offsets GoLayout carries.
WANTED_MEMBERS: dict[str, tuple[str, ...]] = {
    "runtime.g": ("goid", "m"),
    "runtime.m": ("curg",),
    "net/http.Request": ("Method", "URL", "Header"),
    "net/url.URL": ("Path", "Host"),
    "net/http.response": ("status",),
    # HTTP/2 and gRPC servers (producer/server_probes.py): present only when linked in.
    "net/http.http2responseWriter": ("rws",),
    "net/http.http2responseWriterState": ("status", "stream"),
    "net/http/internal/http2.responseWriter": ("rws",),
    "net/http/internal/http2.responseWriterState": ("status", "stream"),
    "net/http/internal/http2.ServerRequest": ("Method", "URL", "Header"),
    "golang.org/x/net/http2.responseWriter": ("rws",),
    "golang.org/x/net/http2.responseWriterState": ("status", "stream"),
    "google.golang.org/grpc/internal/transport.Stream": ("method",),
    "google.golang.org/grpc/internal/status.Status": ("s",),
    "google.golang.org/genproto/googleapis/rpc/status.Status": ("Code",),
    # Clients (producer/client_probes.py)
    "net/http.Response": ("StatusCode",),
    "google.golang.org/grpc/internal/status.Error": ("e",),
    "google.golang.org/grpc.StreamDesc": ("ServerStreams", "ClientStreams"),
    "google.golang.org/grpc/internal/transport.http2Client": ("remoteAddr",),
    "net.TCPAddr": ("IP", "Port"),
    "net/http.persistConn": ("conn", "tlsState"),
    "net.netFD": ("raddr",),
    "crypto/tls.Conn": ("conn",),
}
#: Bigger member offsets than this in those structs are damaged DWARF (runtime.g is < 1 KB).
MAX_MEMBER_OFFSET = 1 << 16
#: Packages whose compile units may hold those types; Go's linker puts all type DIEs in
#: the last "runtime" unit, the others are searched only if that ever changes.
TYPE_UNITS = ("runtime", "net/http", "net/url")


@dataclass(frozen=True)
class StructOffsets:
    """Byte offsets of the Go fields the probes read; -1 when the type is not linked in."""

    goid_offset: int  # runtime.g.goid
    request_method: int  # net/http.Request.Method (a string header)
    request_url: int  # net/http.Request.URL (a *url.URL)
    url_path: int  # net/url.URL.Path (a string header)
    response_status: int  # net/http.response.status (HTTP/1 ResponseWriter)


@dataclass(frozen=True)
class GoLayout:
    """Field offsets for one Go binary, and where they came from.

    ``version`` is the toolchain version string from the binary (e.g. "go1.19.8").
    ``source`` is "dwarf" when read from the binary itself, "table" when taken from
    :data:`FALLBACK_LAYOUTS`; ``note`` explains any approximation (e.g. a newer Go than
    the table knows). HTTP offsets are -1 when the binary has no HTTP server.
    """

    version: str
    goid_offset: int
    request_method: int
    request_url: int
    url_path: int
    response_status: int
    source: LayoutSource
    note: str = ""
    #: Every WANTED_MEMBERS offset DWARF gave, as (struct, member, offset); empty for
    #: table layouts (the server probes then use their own tables).
    dwarf_offsets: tuple[tuple[str, str, int], ...] = ()

    def dwarf_offset(self, struct_name: str, member: str) -> int | None:
        """The DWARF offset of ``struct_name.member``, None when DWARF did not give it."""
        for name, field_name, offset in self.dwarf_offsets:
            if name == struct_name and field_name == member:
                return offset
        return None

    @property
    def http_available(self) -> bool:
        """True if every offset HTTP request tracing needs is known."""
        return min(self.request_method, self.request_url, self.url_path, self.response_status) >= 0


#: Offsets measured from DWARF of tests/targets/goserver built by each toolchain here
#: (Go 1.19.8 and Go 1.27.3, linux/amd64). Keyed by "major.minor".
FALLBACK_LAYOUTS: dict[str, StructOffsets] = {
    "1.19": StructOffsets(
        goid_offset=152, request_method=0, request_url=16, url_path=56, response_status=120
    ),
    "1.27": StructOffsets(
        goid_offset=152, request_method=0, request_url=16, url_path=56, response_status=128
    ),
}

_VERSION_RE = re.compile(r"go(\d+)\.(\d+)")
_cache_lock = threading.Lock()
#: Layouts of the binaries seen last (a node runs many versions over its life: bounded).
LAYOUT_CACHE_ENTRIES = 256
_layout_cache: OrderedDict[tuple[str, int, int, int, int], GoLayout] = OrderedDict()


def go_minor(version: str) -> tuple[int, int] | None:
    """(major, minor) of a Go version string like "go1.27.3" or "devel go1.28-abc"."""
    match = _VERSION_RE.search(version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def is_go_binary(path: str | Path) -> bool:
    """True if ``path`` is an ELF file made by the Go linker, stripped or not.

    Raises TargetError if the file cannot be read; a non-ELF file is simply not Go.
    """
    try:
        return ElfImage.open(path).is_go
    except BinaryLimitExceeded:
        raise
    except UnsupportedBinary:
        return False


def go_version(path: str | Path) -> str | None:
    """The Go toolchain version recorded in ``.go.buildinfo`` (e.g. "go1.19.8"), or None.

    Works on stripped binaries: the runtime keeps the build info for debug.ReadBuildInfo.
    None too when the file is not ELF or its build info cannot be read.
    """
    try:
        with parsing(path):
            return _version_from_image(ElfImage.open(path))
    except BinaryLimitExceeded:
        raise
    except UnsupportedBinary:
        return None


def go_layout(path: str | Path) -> GoLayout:
    """Offsets of the Go fields the probes read, for the Go binary at ``path``.

    DWARF when present (exact), otherwise the table for the binary's Go minor version or
    the nearest lower one (recorded in ``note``). Results are cached per file identity
    (path, device, inode, mtime, size), so a replaced binary is read again.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise TargetError(
            f"cannot read binary {p}: {exc.strerror or exc}; check the path (or the target "
            "pid) and that the agent runs with permission to read it"
        ) from exc
    key = (str(p.resolve()), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    with _cache_lock:
        cached = _layout_cache.get(key)
        if cached is not None:
            _layout_cache.move_to_end(key)
    if cached is not None:
        return cached
    with parsing(p):
        layout = _compute_layout(p)
    with _cache_lock:
        _layout_cache[key] = layout
        while len(_layout_cache) > LAYOUT_CACHE_ENTRIES:
            _layout_cache.popitem(last=False)
    return layout


def dwarf_struct_offsets(path: str | Path) -> dict[str, dict[str, int]] | None:
    """Member offsets of the WANTED_MEMBERS structs from DWARF, or None without DWARF.

    Only the compile units that can hold Go type DIEs are walked, last "runtime" unit
    first, and the walk stops once every struct is found: a full walk of a Go binary's
    DWARF with pyelftools takes seconds, this takes a fraction of one. A damaged DWARF
    section is an UnsupportedBinary (rebuilding with -ldflags=-w drops it).
    """
    with parsing(path):
        image = ElfImage.open(path)
        for info in image.sections_by_index:
            # pyelftools reads each debug section whole: check sizes before it allocates.
            if info.name.startswith((".debug_", ".zdebug_")) and info.sh_type != "SHT_NOBITS":
                check_span(path, f"section {info.name}", info.offset, info.size, image.file_size)
        try:
            with Path(path).open("rb") as f:
                elf = ELFFile(f)
                if not elf.has_dwarf_info():
                    return None
                dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
                if not dwarf.has_debug_info:
                    return None
                return _find_structs(_type_units(dwarf.iter_CUs()), _linked_wanted(path))
        except OSError as exc:
            raise TargetError(f"cannot read DWARF of {path}: {exc.strerror or exc}") from exc


def table_layout(
    version: str, *, has_http: bool = True, reason: str = "", path: str | Path = "a Go binary"
) -> GoLayout:
    """A GoLayout for Go ``version`` from FALLBACK_LAYOUTS, for binaries without DWARF.

    Uses the entry for the version's minor release or, for a release the table does not
    know, the nearest lower one, and says so in ``note``. ``has_http`` False gives -1 for
    the HTTP offsets. Raises UnsupportedBinary for Go older than 1.17 or older than the
    table.
    """
    minor = _supported_minor(version, str(path))
    known = sorted((m, key) for key in FALLBACK_LAYOUTS if (m := go_minor("go" + key)))
    lower = [(m, key) for m, key in known if m <= minor]
    why = reason or "offsets not read from DWARF"
    if not lower:
        raise UnsupportedBinary(
            path,
            f"{why} and no offsets were measured for {version} (the table starts at Go "
            f"{known[0][1]}); trace a build of the service without -ldflags=-w",
        )
    found_minor, key = lower[-1]
    offsets = FALLBACK_LAYOUTS[key]
    note = f"{why}; offsets from the table for Go {key}"
    if found_minor != minor:
        note += (
            f" (nearest measured version below {version}; struct layouts can change "
            "between releases, so verify with a build that keeps DWARF)"
        )
    if not has_http:
        note += f"; no HTTP server linked ({HTTP_SERVER_FUNCTION} absent)"
    unknown = -1
    return GoLayout(
        version=version,
        goid_offset=offsets.goid_offset,
        request_method=offsets.request_method if has_http else unknown,
        request_url=offsets.request_url if has_http else unknown,
        url_path=offsets.url_path if has_http else unknown,
        response_status=offsets.response_status if has_http else unknown,
        source="table",
        note=note,
    )


def _compute_layout(path: Path) -> GoLayout:
    """go_layout without the cache."""
    image = ElfImage.open(path)
    if not image.is_go:
        raise UnsupportedBinary(
            path,
            "not a Go binary (no .go.buildinfo / .gopclntab); goroutine and HTTP tracing "
            "work only for Go services, use plain function probes instead",
        )
    version = _version_from_image(image)
    if version is None:
        raise UnsupportedBinary(
            path,
            "cannot tell which Go version built it (no readable .go.buildinfo); "
            f"Go {MIN_GO[0]}.{MIN_GO[1]}+ binaries carry it, rebuild with a supported Go",
        )
    _supported_minor(version, str(path))
    structs = dwarf_struct_offsets(path)
    if structs is not None and "runtime.g" in structs:
        return _layout_from_dwarf(path, version, structs)
    if structs is None:
        reason = "binary has no DWARF (built with -ldflags=-w)"
    else:
        reason = "DWARF lacks runtime.g"
    return table_layout(version, has_http=_links_http_server(path), reason=reason, path=path)


def _supported_minor(version: str, what: str) -> tuple[int, int]:
    """(major, minor) of ``version``; UnsupportedBinary if unparseable or pre-1.17."""
    minor = go_minor(version)
    if minor is None:
        raise UnsupportedBinary(
            what, f"cannot parse the Go version {version!r}; expected e.g. go1.27.3"
        )
    if minor < MIN_GO:
        raise UnsupportedBinary(
            what,
            f"built by {version}, older than Go {MIN_GO[0]}.{MIN_GO[1]}, whose register ABI "
            "the probes rely on; rebuild it with Go 1.17 or newer",
        )
    return minor


def _layout_from_dwarf(
    path: str | Path, version: str, structs: dict[str, dict[str, int]]
) -> GoLayout:
    """A GoLayout from DWARF member offsets; missing HTTP types give -1."""

    def member(struct_name: str, field: str) -> int:
        offset = structs.get(struct_name, {}).get(field, -1)
        if not -1 <= offset < MAX_MEMBER_OFFSET:
            raise UnsupportedBinary(
                path,
                f"DWARF puts {struct_name}.{field} at offset {offset}, past any real "
                "layout; the debug info is damaged: rebuild with -ldflags=-w to drop it",
            )
        return offset

    return GoLayout(
        version=version,
        goid_offset=member("runtime.g", "goid"),
        request_method=member("net/http.Request", "Method"),
        request_url=member("net/http.Request", "URL"),
        url_path=member("net/url.URL", "Path"),
        response_status=member("net/http.response", "status"),
        source="dwarf",
        dwarf_offsets=tuple(
            (name, field_name, member(name, field_name))
            for name, fields in sorted(structs.items())
            for field_name in sorted(fields)
        ),
    )


def _links_http_server(path: Path) -> bool:
    """True if the binary contains net/http's server loop (so net/http.response exists)."""
    try:
        return HTTP_SERVER_FUNCTION in SymbolTable.from_path(path)
    except BinaryLimitExceeded:
        raise
    except UnsupportedBinary:
        return False


def _version_from_image(image: ElfImage) -> str | None:
    """Version string from the build info blob of ``image``, or None if it has none."""
    data = image.section_data(".go.buildinfo")
    if data is None:
        data = _find_buildinfo(image)
    if data is None or not data.startswith(BUILDINFO_MAGIC) or len(data) < BUILDINFO_HEADER_SIZE:
        return None
    ptr_size, flags = data[14], data[15]
    if flags & BUILDINFO_FLAG_INLINE_STRINGS:
        # Go 1.18+: uvarint length + bytes, right after the 32-byte header.
        return _uvarint_string(data, BUILDINFO_HEADER_SIZE)
    return _pointer_version(image, data, ptr_size, bool(flags & BUILDINFO_FLAG_BIG_ENDIAN))


def _find_buildinfo(image: ElfImage) -> bytes | None:
    """The build info blob found by scanning writable segments (no section headers)."""
    with image.reader() as f:
        for seg in image.segments:
            if not seg.flags & 2:  # PF_W: the blob lives in the data segment
                continue
            check_time()
            check_span(image.path, "a data segment", seg.offset, seg.filesz, image.file_size)
            f.seek(seg.offset)
            blob = f.read(seg.filesz)
            at = blob.find(BUILDINFO_MAGIC)
            while at >= 0:
                if at % 16 == 0:  # the linker aligns it to 16
                    return blob[at : at + 64 * 1024]
                at = blob.find(BUILDINFO_MAGIC, at + 1)
    return None


def _uvarint_string(data: bytes, at: int) -> str | None:
    """A uvarint-length-prefixed UTF-8 string at ``data[at:]``, or None if malformed."""
    length = shift = 0
    while at < len(data):
        byte = data[at]
        at += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            raw = data[at : at + length]
            return raw.decode("utf-8", "replace") if len(raw) == length and raw else None
        shift += 7
        if shift > 63:
            break
    return None


def _pointer_version(image: ElfImage, data: bytes, ptr_size: int, big: bool) -> str | None:
    """Pre-1.18 build info: a pointer to the runtime.buildVersion string header."""
    if ptr_size not in (4, 8):
        return None
    e = ">" if big else "<"
    word = "Q" if ptr_size == 8 else "I"
    (header_ptr,) = struct.unpack_from(e + word, data, 16)
    header = image.read_address(header_ptr, 2 * ptr_size)
    if header is None:
        return None
    string_ptr, length = struct.unpack(e + word * 2, header)
    if not 0 < length < 4096:
        return None
    raw = image.read_address(string_ptr, length)
    return raw.decode("utf-8", "replace") if raw else None


def _type_units(units: Iterable[CompileUnit]) -> list[CompileUnit]:
    """Compile units that may hold Go type DIEs, most likely first."""
    by_name: dict[str, list[CompileUnit]] = {name: [] for name in TYPE_UNITS}
    for cu in units:
        check_time()
        attr = cu.get_top_DIE().attributes.get("DW_AT_name")
        name = attr.value.decode("utf-8", "replace") if attr else ""
        if name in by_name:
            by_name[name].append(cu)
    ordered = list(reversed(by_name["runtime"]))
    for name in TYPE_UNITS[1:]:
        ordered.extend(by_name[name])
    return ordered


#: Wanted structs of packages a binary may not link (the HTTP/2 servers, gRPC servers and
#: clients), by the functions of which one is linked whenever they are used.
OPTIONAL_STRUCTS: dict[str, tuple[str, ...]] = {
    "net/http.http2": ("net/http.(*http2serverConn).runHandler",),
    "net/http/internal/http2.": ("net/http/internal/http2.(*serverConn).runHandler",),
    "golang.org/x/net/http2.": ("golang.org/x/net/http2.(*serverConn).runHandler",),
    "google.golang.org/": (
        "google.golang.org/grpc.(*Server).handleStream",
        "google.golang.org/grpc.invoke",
        "google.golang.org/grpc.newClientStream",
    ),
}


def _linked_wanted(path: str | Path) -> dict[str, tuple[str, ...]]:
    """WANTED_MEMBERS without the optional structs of servers the binary does not link: the
    walk stops once every wanted struct is found, and an absent one makes it read all."""
    try:
        table = SymbolTable.from_path(path)
    except UnsupportedBinary:
        return WANTED_MEMBERS
    return {
        name: members
        for name, members in WANTED_MEMBERS.items()
        if all(
            not name.startswith(prefix) or any(function in table for function in functions)
            for prefix, functions in OPTIONAL_STRUCTS.items()
        )
    }


def _find_structs(
    units: Iterable[CompileUnit], wanted: dict[str, tuple[str, ...]]
) -> dict[str, dict[str, int]]:
    """Member offsets of the wanted structs found among the top-level DIEs of ``units``."""
    found: dict[str, dict[str, int]] = {}
    for cu in units:
        for die in cu.get_top_DIE().iter_children():
            check_time()
            if die.tag != "DW_TAG_structure_type" or "DW_AT_declaration" in die.attributes:
                continue
            attr = die.attributes.get("DW_AT_name")
            name = attr.value.decode("utf-8", "replace") if attr else ""
            if name in wanted and name not in found:
                found[name] = _member_offsets(die, wanted[name])
                if len(found) == len(wanted):
                    return found
    return found


def _member_offsets(die: DIE, members: tuple[str, ...]) -> dict[str, int]:
    """DW_AT_data_member_location of the named members of a structure DIE."""
    offsets: dict[str, int] = {}
    for child in die.iter_children():
        if child.tag != "DW_TAG_member":
            continue
        attr = child.attributes.get("DW_AT_name")
        name = attr.value.decode("utf-8", "replace") if attr else ""
        loc = child.attributes.get("DW_AT_data_member_location")
        if name in members and loc is not None:
            value = _location_constant(loc.value)
            if value is not None:
                offsets[name] = value
    return offsets


def _location_constant(value: object) -> int | None:
    """A member location as an int: a constant form, or DW_OP_plus_uconst N."""
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and value[0] == 0x23:  # DW_OP_plus_uconst
        result = shift = 0
        for byte in (int(b) for b in value[1:]):
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
    return None


def clear_layout_cache() -> None:
    """Forget cached layouts, e.g. to time a cold parse."""
    with _cache_lock:
        _layout_cache.clear()
