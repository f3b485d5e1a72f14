"""Topics: what exists, with how many partitions, and creating what is missing.

Only the all-topics listing decides what exists: Tansu and Kafka brokers with
auto-creation create any topic named in a metadata request, with their default count.
"""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from ebpf_apm.kafka.clients import new_admin
from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.errors import (
    KafkaUnavailableError,
    TopicSetupError,
    describe_error,
    unreachable_hint,
)


async def ensure_topics(
    connection: KafkaConnection,
    topics: dict[str, int],
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> dict[str, int]:
    """Create the missing topics with the given partition counts; return actual counts.

    Existing topics are left as they are (their partition count may differ from the one
    asked for: the returned dict tells).
    """
    admin = new_admin(connection, timeout_s=timeout_s)
    try:
        await _start(admin, connection, f"create topics {', '.join(topics)}")
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, partitions, replication_factor)
            for name, partitions in topics.items()
            if name not in existing
        ]
        if missing:
            response = await admin.create_topics(missing)
            for entry in response.topic_errors:
                name, code = entry[0], entry[1]
                if code in (0, TopicAlreadyExistsError.errno):  # lost a race: fine
                    continue
                message = entry[2] if len(entry) > 2 else None
                raise TopicSetupError(
                    f"Kafka at {connection} refused to create topic {name!r} with "
                    f"{topics[name]} partitions: {for_code(code).__name__} ({message or code})"
                )
        return await _partition_counts(admin, connection, list(topics), timeout_s)
    finally:
        await admin.close()


async def existing_partition_counts(connection: KafkaConnection) -> dict[str, int]:
    """Partition count of every topic that exists (internal `__` topics left out)."""
    admin = new_admin(connection)
    try:
        await _start(admin, connection, "list topics")
        try:
            names = [t for t in await admin.list_topics() if not t.startswith("__")]
            if not names:
                return {}
            described = await admin.describe_topics(names)
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"cannot list topics on Kafka at {connection}: {describe_error(exc)}"
            ) from exc
        return {t["topic"]: len(t["partitions"]) for t in described if not t["error_code"]}
    finally:
        await admin.close()


async def _start(admin: AIOKafkaAdminClient, connection: KafkaConnection, purpose: str) -> None:
    try:
        await admin.start()
    except KafkaError as exc:
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {connection} to {purpose}: {describe_error(exc)}; "
            f"{unreachable_hint(exc)}"
        ) from exc


async def _partition_counts(
    admin: AIOKafkaAdminClient, connection: KafkaConnection, names: list[str], timeout_s: float
) -> dict[str, int]:
    # A real Kafka may answer LeaderNotAvailable for a topic created a moment ago.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        described = await admin.describe_topics(names)
        errors = {t["topic"]: t["error_code"] for t in described if t["error_code"]}
        if not errors:
            return {t["topic"]: len(t["partitions"]) for t in described}
        if loop.time() > deadline or not all(for_code(c).retriable for c in errors.values()):
            detail = ", ".join(f"{n}: {for_code(c).__name__}" for n, c in errors.items())
            raise TopicSetupError(f"Kafka at {connection} cannot describe topics ({detail})")
        await asyncio.sleep(0.2)
