"""Reading one trace's spans back from `apm.spans` (storage keeps sketches, not spans), for
`ebpf-apm query --trace` and the dashboard's trace page.

    apm.spans (every partition, from the offsets at --since) -> the records of the trace
      (a byte search for the id before decoding) -> dicts as span.avsc decodes them

Within the topic's retention; read up to the end the topic had when reading began.
"""

from __future__ import annotations

from typing import Any

from ebpf_apm.consumers.kafka_io import TopicReader
from ebpf_apm.kafka import topics
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.schemas.avro_codec import codec

_CLIENT_ID = "ebpf-apm-trace"


async def read_trace(
    connection: KafkaConnection, trace_id: str, since_ms: int, until_ms: int
) -> list[dict[str, Any]]:
    """Every record of `apm.spans` with this trace id, published in [since_ms, until_ms),
    read up to the end the topic had when reading began."""
    reader = TopicReader(connection, topics.SPANS, client_id=_CLIENT_ID)
    await reader.start(from_beginning=True)
    try:
        ends = await reader.seek_to_time(since_ms)
        decode = codec("span.avsc").decode
        needle = trace_id.encode()
        spans: list[dict[str, Any]] = []
        while not await reader.reached(ends):
            for record in await reader.poll(500):
                value = record.value
                if value is None or needle not in value:
                    continue
                if not since_ms <= record.timestamp < until_ms:
                    continue
                try:
                    span = decode(value)
                except ValueError:
                    continue  # not a span record; the consumers dead-letter it
                if span.get("trace_id") == trace_id:
                    spans.append(span)
        return spans
    finally:
        await reader.stop()
