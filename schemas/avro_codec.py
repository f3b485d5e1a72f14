"""Avro single-object encoding for the result topics (apm.spans, apm.latency, apm.alerts).

Each message is 0xC3 0x01, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
schema's canonical form, then the Avro binary body. A subscriber needs only the `.avsc`
file: it checks the fingerprint and decodes the body with any Avro library.
"""

from __future__ import annotations

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
        canonical = fastavro.schema.to_parsing_canonical_form(self.schema)
        fingerprint = fastavro.schema.fingerprint(canonical, "CRC-64-AVRO")
        self.fingerprint = int(fingerprint, 16).to_bytes(8, "little")
        self.header = MAGIC + self.fingerprint

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
        if value[2:HEADER_SIZE] != self.fingerprint:
            raise AvroDecodeError(
                f"writer schema fingerprint {value[2:HEADER_SIZE].hex()} is not "
                f"{self.path.name} ({self.fingerprint.hex()})"
            )
        try:
            record = fastavro.schemaless_reader(io.BytesIO(value[HEADER_SIZE:]), self.schema, None)
        except Exception as exc:  # fastavro raises EOFError, ValueError, ... on bad bodies
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise AvroDecodeError(f"bad Avro body for {self.path.name}: {why}") from exc
        assert isinstance(record, dict)
        return record


@cache
def codec(schema_file: str) -> AvroCodec:
    """The shared codec of a schema file, e.g. codec("span.avsc")."""
    return AvroCodec(schema_file)
