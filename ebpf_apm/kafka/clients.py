"""aiokafka clients built from a `KafkaConnection`, with the project's tuning in one place.

Every producer, consumer and admin client of the project is made here, so connection
settings apply to all of them and aiokafka's quirks are handled once:
- its repeated reconnect warnings are rate-limited (`quiet_aiokafka_logs`);
- its lz4 compresses at level 9 (LZ4 HC), which cost half the agent's CPU at 1.2M spans/s
  for ~2% smaller messages: batches are compressed at level 1 (`use_fast_lz4`);
- its 16 KiB default batch would send each of our (already batched) messages in a request
  of its own: batches go up to 1 MiB;
- a failed start says only "Unable to bootstrap": the clients made here find out whether TLS
  or SASL was the cause (`ebpf_apm.kafka.handshake`) and raise that instead.
aiokafka is pinned below 0.15: `use_fast_lz4` and `stop_producer` reach into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import codec as aiokafka_codec
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.handshake import diagnose

MiB = 1 << 20
MAX_BATCH_BYTES = 1 * MiB
MAX_REQUEST_BYTES = 4 * MiB  # the agent's messages go up to 4 MiB
_LZ4_LEVEL = 1
_AIOKAFKA_REPEAT_INTERVAL_S = 300.0
_STOP_GRACE_S = 1.0


def new_producer(
    connection: KafkaConnection,
    client_id: str,
    *,
    compression: str | None = None,
    linger_ms: int = 5,
    max_request_size: int = MAX_REQUEST_BYTES,
    **options: Any,
) -> AIOKafkaProducer:
    """A producer with acks=all (unless `options` say otherwise); not started."""
    quiet_aiokafka_logs()
    use_fast_lz4()
    settings: dict[str, Any] = {
        "acks": "all",
        "enable_idempotence": False,
        "max_batch_size": min(max_request_size, MAX_BATCH_BYTES),
    }
    settings.update(options)
    return _Producer(
        connection,
        client_id=client_id,
        compression_type=None if compression in (None, "none") else compression,
        linger_ms=linger_ms,
        max_request_size=max_request_size,
        **settings,
    )


async def stop_producer(producer: AIOKafkaProducer, flushed: bool) -> None:
    """producer.stop(), without waiting out the request timeout for batches a broker that is
    away won't take.

    aiokafka's stop() waits until every batch it holds is delivered or expired (minutes,
    with the timeouts that ride out a frozen broker). When the caller's flush already timed
    out, stop its sender after a short grace instead, and stop() then completes; the caller
    counts the batches as not delivered. This reaches into aiokafka 0.14 (pinned below
    0.15); without that attribute stop() is only slower.
    """
    stopping = asyncio.create_task(producer.stop())
    if not flushed:
        done, _ = await asyncio.wait({stopping}, timeout=_STOP_GRACE_S)
        sender = getattr(producer, "_sender", None)
        if not done and sender is not None:
            # stop() returns once the sender task is done. aiokafka's own flush task stays
            # pending on the abandoned batches until the event loop shuts down. (Failing them
            # with the accumulator's fail_all() trips over re-enqueued batches in 0.14.)
            await sender.close()
    await stopping


def new_consumer(
    connection: KafkaConnection, client_id: str, *, group_id: str | None, **options: Any
) -> AIOKafkaConsumer:
    """A consumer that never commits by itself; not started."""
    quiet_aiokafka_logs()
    settings: dict[str, Any] = {
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": MAX_REQUEST_BYTES,
    }
    settings.update(options)
    return _Consumer(connection, client_id=client_id, group_id=group_id, **settings)


def new_admin(
    connection: KafkaConnection, client_id: str = "ebpf-apm-admin", timeout_s: float = 30.0
) -> AIOKafkaAdminClient:
    quiet_aiokafka_logs()
    return _Admin(
        connection,
        client_id=client_id,
        request_timeout_ms=int(timeout_s * 1000),
    )


async def _start_explained(
    connection: KafkaConnection, start: Callable[[], Awaitable[None]]
) -> None:
    """Start a client; a failure caused by TLS or SASL is raised as what it is."""
    try:
        await start()
    except KafkaConnectionError as exc:
        explained = await diagnose(connection)
        if explained is None:
            raise
        raise explained from exc


# aiokafka's three clients, each with a start() that explains a TLS or SASL failure. Subclasses
# rather than a wrapper: callers keep using (and typing) them as aiokafka's own clients.
class _Producer(AIOKafkaProducer):
    def __init__(self, connection: KafkaConnection, **options: Any) -> None:
        super().__init__(**connection.client_options(), **options)
        self._apm_connection = connection

    async def start(self) -> None:
        await _start_explained(self._apm_connection, super().start)


class _Consumer(AIOKafkaConsumer):
    def __init__(self, connection: KafkaConnection, **options: Any) -> None:
        super().__init__(**connection.client_options(), **options)
        self._apm_connection = connection

    async def start(self) -> None:
        await _start_explained(self._apm_connection, super().start)


class _Admin(AIOKafkaAdminClient):
    def __init__(self, connection: KafkaConnection, **options: Any) -> None:
        super().__init__(**connection.client_options(), **options)
        self._apm_connection = connection

    async def start(self) -> None:
        await _start_explained(self._apm_connection, super().start)


class _RepeatFilter(logging.Filter):
    """Passes each distinct aiokafka warning/error once per interval.

    While a broker is down aiokafka logs every failed reconnect (about ten lines a second);
    the services report the outage themselves, once.
    """

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.WARNING <= record.levelno < logging.CRITICAL:
            return True  # debug output was asked for; critical is never repetitive noise
        key = (record.name, record.msg)  # the template: arguments (addresses...) vary
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            return False
        self._last[key] = now
        return True


_AIOKAFKA_FILTER = _RepeatFilter(_AIOKAFKA_REPEAT_INTERVAL_S)


def quiet_aiokafka_logs() -> None:
    """Rate-limit aiokafka's repeated warnings and errors (idempotent).

    A logger's filters do not apply to its children, so the filter goes on every aiokafka
    logger; they all exist once aiokafka is imported.
    """
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "aiokafka"]
    for name in ["aiokafka", *names]:
        logger = logging.getLogger(name)
        if _AIOKAFKA_FILTER not in logger.filters:
            logger.addFilter(_AIOKAFKA_FILTER)


def _lz4_encode(payload: bytes, level: int = _LZ4_LEVEL) -> bytes:
    return bytes(aiokafka_codec.lz4_encode(payload, level))


def use_fast_lz4() -> None:
    """Make aiokafka's record batches use _LZ4_LEVEL (idempotent).

    Its batch builders (the Cython one and the pure-Python fallback) call the module-level
    name `lz4_encode` with the default level, so that name is replaced in both. Readers
    decode any level.
    """
    from aiokafka.record import default_records  # noqa: PLC0415

    modules: list[Any] = [default_records]
    with contextlib.suppress(ImportError):
        from aiokafka.record._crecords import (  # noqa: PLC0415
            default_records as c_records,
        )

        modules.append(c_records)
    for module in modules:
        if getattr(module, "lz4_encode", None) is aiokafka_codec.lz4_encode:
            module.lz4_encode = _lz4_encode
