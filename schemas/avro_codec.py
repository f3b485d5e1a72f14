"""Avro single-object encoding for the result topics (apm.spans, apm.latency, apm.alerts).

Each message is 0xC3 0x01, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
schema's canonical form, then the Avro binary body. A subscriber needs only the `.avsc`
file: it checks the fingerprint and decodes the body with any Avro library.

Schemas evolve by adding optional fields with defaults at the end, each marked with
`"since": N` (the schema version that added it). The writer schema of version M < N is the
file without the fields since M+1, so every earlier version's fingerprint is known from the
one file: a record of an older writer is read with its own schema and resolved to the
current one (the new fields get their defaults).
"""

from __future__ import annotations

import copy
import io
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

from ebpf_apm.schemas.input_limits import MAX_MESSAGE_BYTES, InputRejected

SCHEMA_DIR = Path(str(resources.files(__package__ or "ebpf_apm.schemas")))
MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8


class AvroDecodeError(InputRejected):
    """A message is not a single-object Avro record of the expected schema."""


class AvroCodec:
    """Encoder and decoder for one schema file in schemas/."""

    def __init__(self, schema_file: str) -> None:
        self.path = SCHEMA_DIR / schema_file
        self.schema = fastavro.schema.load_schema(str(self.path))
        self.fingerprint = _fingerprint(self.schema)
        self.header = MAGIC + self.fingerprint
        # Fingerprint of each earlier version -> that version's writer schema.
        self.older: dict[bytes, tuple[int, Any]] = {}
        for version, schema in _earlier_versions(self.schema):
            self.older[_fingerprint(schema)] = (version, schema)

    def encode(self, record: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        out.write(self.header)
        fastavro.schemaless_writer(out, self.schema, record)
        return out.getvalue()

    def decode(self, value: bytes) -> dict[str, Any]:
        if len(value) > MAX_MESSAGE_BYTES:
            raise AvroDecodeError(f"{len(value)} bytes, more than the limit of {MAX_MESSAGE_BYTES}")
        if len(value) < HEADER_SIZE or value[:2] != MAGIC:
            raise AvroDecodeError("not Avro single-object encoding (no 0xC3 0x01 marker)")
        writer = self.schema
        if value[2:HEADER_SIZE] != self.fingerprint:
            if value[2:HEADER_SIZE] not in self.older:
                known = [self.fingerprint.hex(), *(f.hex() for f in self.older)]
                raise AvroDecodeError(
                    f"writer schema fingerprint {value[2:HEADER_SIZE].hex()} is not "
                    f"{self.path.name} (any of its versions: {', '.join(known)})"
                )
            writer = self.older[value[2:HEADER_SIZE]][1]
        try:
            reader = None if writer is self.schema else self.schema
            record = fastavro.schemaless_reader(io.BytesIO(value[HEADER_SIZE:]), writer, reader)
        except Exception as exc:  # fastavro raises EOFError, ValueError, ... on bad bodies
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise AvroDecodeError(f"bad Avro body for {self.path.name}: {why}") from exc
        assert isinstance(record, dict)
        return record


def _fingerprint(schema: Any) -> bytes:
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    return int(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "little")


def _earlier_versions(schema: Any) -> list[tuple[int, Any]]:
    """(version, writer schema) of each version before the newest `"since"` of a record."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return []
    versions = sorted({int(f.get("since", 1)) for f in schema["fields"]})
    earlier = []
    for version in range(1, versions[-1]):
        old = copy.deepcopy(schema)
        old["fields"] = [f for f in schema["fields"] if int(f.get("since", 1)) <= version]
        earlier.append((version, fastavro.schema.parse_schema(old)))
    return earlier


@cache
def codec(schema_file: str) -> AvroCodec:
    """The shared codec of a schema file, e.g. codec("span.avsc")."""
    return AvroCodec(schema_file)
