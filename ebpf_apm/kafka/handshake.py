"""Why a client could not connect: TLS and SASL failures told apart from an absent broker.

aiokafka logs the cause of a failed bootstrap and raises only "Unable to bootstrap from
[...]", which reads like an outage. When a client of the edge fails to start, `diagnose`
repeats the handshake with one broker connection per bootstrap server, step by step
(TCP and TLS, then SASL), and turns the first real cause into a `KafkaHandshakeError` that
says what failed and what to do. An unreachable broker stays what it was (None: the
original error is kept, and retrying is right).

    client.start() fails --> diagnose(connection) --> KafkaHandshakeError (not retriable)
                                                  --> None (outage: keep the original)
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from ebpf_apm.kafka.connection import KafkaConnection
from ebpf_apm.kafka.security import KafkaSecurity

_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_TIMEOUT_S = 5.0
_ALERT_WAIT_S = 0.5
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNEXPECTED_EOF_WHILE_READING")
_SASL_ERRORS = (
    SaslAuthenticationFailed,
    AuthenticationFailedError,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
)


class KafkaHandshakeError(KafkaError):
    """The broker answers, but TLS or SASL fails: retrying with these settings cannot help."""

    retriable = False
    self_describing = True  # a whole sentence: describe_error shows it alone

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "TLS or SASL handshake failed"


async def diagnose(connection: KafkaConnection) -> KafkaHandshakeError | None:
    """The TLS or SASL failure at the first bootstrap server that has one, else None.

    Only a failure that repeats for a reason of its own counts: a connection closed for no
    stated reason (a broker going away, or behind a TLS terminator whose broker is down) is
    an outage unless a second look shows the protocol is wrong, so retrying stays possible.
    """
    security = connection.security
    for host, port in connection.servers:
        where = f"Kafka at {host}:{port}"
        if security.uses_tls:
            problem = await _tls_attempt(host, port, security.ssl_context)
            # A plaintext listener hangs up on a ClientHello (Kafka) or waits for the rest of
            # what it takes for a huge request (Tansu): is a plaintext Kafka there?
            if isinstance(problem, TimeoutError) or (
                isinstance(problem, ssl.SSLError) and _ended_early(problem)
            ):
                if await _kafka_attempt(host, port, {"security_protocol": "PLAINTEXT"}) is None:
                    return KafkaHandshakeError(_plaintext_listener(where))
                continue
            if isinstance(problem, ssl.SSLError):
                return KafkaHandshakeError(_tls_failure(where, host, security, problem))
        else:
            problem = await _kafka_attempt(host, port, {"security_protocol": "PLAINTEXT"})
            if isinstance(problem, KafkaConnectionError) and await _speaks_tls(host, port):
                return KafkaHandshakeError(
                    f"{where} speaks TLS and this client does not: set "
                    "--kafka-security-protocol SSL or SASL_SSL (KAFKA_SECURITY_PROTOCOL) and "
                    "--kafka-ca-file"
                )
        if problem is not None or not security.uses_sasl:
            continue  # unreachable (an outage, not a setting), or fine without SASL
        problem = await _kafka_attempt(host, port, security.client_options())
        if isinstance(problem, _SASL_ERRORS):
            return KafkaHandshakeError(_sasl_failure(where, security, problem))
    return None


async def _tls_attempt(
    host: str, port: int, context: ssl.SSLContext | None
) -> BaseException | None:
    """A TLS handshake, then a short read: a TLS 1.3 server that wants a client certificate
    sends its refusal (an alert) only after the handshake has completed."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context), _TIMEOUT_S
        )
    except (TimeoutError, OSError) as exc:
        return exc
    try:
        await asyncio.wait_for(reader.read(1), _ALERT_WAIT_S)
    except TimeoutError:
        pass  # nothing to read and no alert: the handshake was accepted
    except OSError as exc:
        return exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return None


async def _kafka_attempt(host: str, port: int, options: dict[str, Any]) -> BaseException | None:
    try:
        conn = await asyncio.wait_for(
            create_conn(
                host,
                port,
                client_id="ebpf-apm-handshake-check",
                request_timeout_ms=int(_TIMEOUT_S * 1000),
                **options,
            ),
            _TIMEOUT_S,
        )
    except (TimeoutError, OSError, KafkaError) as exc:
        return exc
    conn.close()
    return None


async def _speaks_tls(host: str, port: int) -> bool:
    """Whether a TLS handshake succeeds there, whoever's certificate it shows."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asking whether it is TLS at all
    problem = await _tls_attempt(host, port, context)
    # A refusal in TLS (an alert: "certificate required") is TLS too.
    return problem is None or (isinstance(problem, ssl.SSLError) and not _ended_early(problem))


def _ended_early(exc: ssl.SSLError) -> bool:
    """The server hung up on the ClientHello, or answered something that is not TLS."""
    return exc.reason in _NOT_TLS or isinstance(exc, ssl.SSLEOFError)


def _plaintext_listener(where: str) -> str:
    return (
        f"TLS handshake with {where} failed: it is a plaintext Kafka listener; use the "
        "broker's TLS listener (its port), or --kafka-security-protocol PLAINTEXT "
        "(SASL_PLAINTEXT) if plaintext is what you mean"
    )


def _client_cert(security: KafkaSecurity) -> str:
    if security.cert_file:
        return f"this client sent the certificate {security.cert_file}"
    return "this client sent no certificate"


def _tls_failure(where: str, host: str, security: KafkaSecurity, exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        if exc.verify_code in _NAME_MISMATCH:
            return (
                f"TLS handshake with {where} failed: the broker's certificate is not issued "
                f"for the name {host!r} ({detail}); connect with a name the certificate lists "
                "in its subject alternative names (--bootstrap-servers and the broker's "
                "advertised listeners), or reissue the certificate"
            )
        return (
            f"TLS handshake with {where} failed: the broker's certificate cannot be verified "
            f"({detail}) with the CA of {_ca(security)}; give --kafka-ca-file / KAFKA_CA_FILE "
            "the CA certificate that signed the broker's"
        )
    reason = exc.reason or str(exc)
    return (
        f"TLS handshake with {where} failed: the broker refused the handshake ({reason}); "
        f"{_client_cert(security)}: if the listener requires client certificates (mutual "
        "TLS), give --kafka-cert-file and --kafka-key-file with one its CA signed"
    )


def _sasl_failure(where: str, security: KafkaSecurity, exc: BaseException) -> str:
    who = f"user {security.sasl_username!r} with {security.sasl_mechanism}"
    if isinstance(exc, SaslAuthenticationFailed | AuthenticationFailedError):
        return (
            f"SASL authentication of {who} failed at {where} ({_said(exc)}): check the user name "
            "(--kafka-sasl-username / KAFKA_SASL_USERNAME), the password "
            "(--kafka-sasl-password-file / KAFKA_SASL_PASSWORD_FILE) and that the user exists "
            "for this mechanism"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return (
            f"{where} does not offer SASL {security.sasl_mechanism} ({_said(exc)}); choose a "
            "mechanism it offers with --kafka-sasl-mechanism / KAFKA_SASL_MECHANISM, or, if it "
            "offers none (the embedded broker, Tansu, has no SASL), the protocol its listener "
            "speaks: --kafka-security-protocol SSL or PLAINTEXT"
        )
    return (
        f"{where} refused the SASL handshake of {who} ({_said(exc)}); check the "
        "listener's SASL set-up"
    )


def _said(exc: BaseException) -> str:
    """A broker error's text; aiokafka builds some from the connection object (unreadable)."""
    if exc.args and isinstance(exc.args[0], str):
        return str(exc)
    return str(getattr(exc, "message", None) or type(exc).__name__)


def _ca(security: KafkaSecurity) -> str:
    return security.ca_file or "the system store"
