"""The Kafka edge's exceptions, and the one way a Kafka error is described to a user."""

from __future__ import annotations

from ebpf_apm.errors import ApmError, InputError


class KafkaEdgeError(ApmError):
    """Kafka cannot be used as the command needs it (exit status 1)."""


class KafkaConfigError(KafkaEdgeError, InputError):
    """A Kafka setting (flag or environment) is invalid (exit status 2)."""


class KafkaUnavailableError(KafkaEdgeError):
    """No broker of the bootstrap list answered."""


class TopicSetupError(KafkaEdgeError):
    """Kafka refused to create or describe a topic."""


def describe_error(exc: BaseException) -> str:
    """ "TypeName: message", for error messages that say what failed."""
    name, text = type(exc).__name__, str(exc)
    if getattr(exc, "self_describing", False):  # TLS and SASL failures say it all
        return text
    if getattr(exc, "self_describing", False):  # handshake errors are whole sentences
        return text
    # aiokafka's messages often start with the class name already.
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def unreachable_hint(exc: BaseException | None = None) -> str:
    """What to do when no broker could be used; `exc`, when given, may say it is a setting."""
    if getattr(exc, "self_describing", False):
        return "fix the Kafka security settings (--kafka-* flags / KAFKA_* environment)"
    return "start one with `ebpf-apm broker` or set --bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS"
