"""The consumer services' exception family, under ebpf_apm.errors.ApmError.

`ebpf_apm.cli.main` prints the message and exits with the status: 1 when Kafka or storage
could not do the work, 2 (`ConsumerConfigError`) when a flag, a rules file or the topics'
layout must be changed.
"""

from __future__ import annotations

from ebpf_apm.errors import ApmError, InputError


class ConsumerError(ApmError):
    """A consumer service cannot go on (exit status 1)."""


class ConsumerConfigError(ConsumerError, InputError):
    """A flag, file or topic layout is wrong (exit status 2)."""


class ConsumerKafkaError(ConsumerError):
    """Kafka refused what the service needs of it: joining the group, reading, sending."""


class TopicLayoutError(ConsumerConfigError):
    """Input topics that must be co-partitioned are not."""
