"""How a client proves who it is and checks who the broker is: TLS and SASL settings.

    flags / KAFKA_* environment --> security_from_args --> KafkaSecurity
        KafkaSecurity.client_options() --> every aiokafka client (ebpf_apm.kafka.clients)

Files are read and the TLS context is built once, when the command starts, so a missing
file, a key that does not match its certificate or a wrong key password stops the command
at once with the file named, not at the first connection. Passwords come from files (or,
for containers, the environment), never from flags (a flag is visible in `ps`), and are
held as `Secret`s, which never print their value.

The protocol, when not given, follows from the other settings: SASL settings mean
SASL_SSL (a password never travels in the clear unless SASL_PLAINTEXT is asked for by
name), TLS files mean SSL, nothing means PLAINTEXT.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebpf_apm.kafka.errors import KafkaConfigError

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_MAX_SECRET_BYTES = 64 * 1024
_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")

# flag destination -> environment variable, for the settings that have both.
ENVIRONMENT = {
    "kafka_security_protocol": "KAFKA_SECURITY_PROTOCOL",
    "kafka_ca_file": "KAFKA_CA_FILE",
    "kafka_cert_file": "KAFKA_CERT_FILE",
    "kafka_key_file": "KAFKA_KEY_FILE",
    "kafka_key_password_file": "KAFKA_KEY_PASSWORD_FILE",
    "kafka_sasl_mechanism": "KAFKA_SASL_MECHANISM",
    "kafka_sasl_username": "KAFKA_SASL_USERNAME",
    "kafka_sasl_password_file": "KAFKA_SASL_PASSWORD_FILE",
}
KEY_PASSWORD_ENV = "KAFKA_KEY_PASSWORD"
SASL_PASSWORD_ENV = "KAFKA_SASL_PASSWORD"
CHECK_HOSTNAME_ENV = "KAFKA_CHECK_HOSTNAME"


class Secret:
    """A password: compared and used, never shown (repr, str, logs, tracebacks)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class KafkaSecurity:
    """Validated TLS and SASL settings; `PLAINTEXT` (the default) has none."""

    protocol: str = "PLAINTEXT"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: Secret | None = None
    check_hostname: bool = True
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:  # all of them at once, a line each
            raise KafkaConfigError("\n".join(problems))
        if self.uses_tls and self.ssl_context is None:
            object.__setattr__(self, "ssl_context", self._load_ssl_context())

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def _problems(self) -> list[str]:
        problems: list[str] = []
        if self.protocol not in PROTOCOLS:
            problems.append(
                f"unknown Kafka security protocol {self.protocol!r} "
                f"(--kafka-security-protocol / KAFKA_SECURITY_PROTOCOL): use one of "
                f"{', '.join(PROTOCOLS)}"
            )
            return problems
        tls_files = [f for f in (self.ca_file, self.cert_file, self.key_file) if f]
        if tls_files and not self.uses_tls:
            problems.append(
                f"TLS files ({', '.join(tls_files)}) were given but the Kafka security protocol "
                f"is {self.protocol}, which has no TLS: use SSL or SASL_SSL, or drop the files"
            )
        if bool(self.cert_file) != bool(self.key_file):
            problems.append(
                "a client certificate needs both --kafka-cert-file and --kafka-key-file "
                "(KAFKA_CERT_FILE / KAFKA_KEY_FILE); only one was given"
            )
        if self.key_password is not None and not self.key_file:
            problems.append("a key password was given without --kafka-key-file")
        sasl_given = self.sasl_mechanism or self.sasl_username or self.sasl_password
        if sasl_given and not self.uses_sasl:
            problems.append(
                f"SASL settings were given but the Kafka security protocol is {self.protocol}: "
                "use SASL_SSL (or SASL_PLAINTEXT, which sends the password in the clear)"
            )
        if self.uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                got = f"; got {self.sasl_mechanism!r}" if self.sasl_mechanism else ""
                problems.append(
                    f"SASL needs a mechanism (--kafka-sasl-mechanism / KAFKA_SASL_MECHANISM), "
                    f"one of {', '.join(SASL_MECHANISMS)}{got}"
                )
            if not self.sasl_username:
                problems.append(
                    "SASL needs a user name (--kafka-sasl-username / KAFKA_SASL_USERNAME)"
                )
            if self.sasl_password is None:
                problems.append(
                    "SASL needs a password: --kafka-sasl-password-file FILE, "
                    f"KAFKA_SASL_PASSWORD_FILE or {SASL_PASSWORD_ENV}"
                )
        return problems

    def _load_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = self.check_hostname
        if self.ca_file:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise KafkaConfigError(
                    f"cannot load the Kafka CA file {self.ca_file} (--kafka-ca-file / "
                    f"KAFKA_CA_FILE): {_reason(exc)}; give a PEM file with the certificate "
                    "of the CA that signed the brokers' certificates"
                ) from None
        if self.cert_file and self.key_file:
            password = self.key_password.reveal() if self.key_password else None
            try:
                context.load_cert_chain(self.cert_file, self.key_file, password=password)
            except (OSError, ssl.SSLError) as exc:
                raise KafkaConfigError(
                    f"cannot load the Kafka client certificate {self.cert_file} with key "
                    f"{self.key_file}: {_reason(exc)}; check that both are PEM files, that the "
                    "key belongs to the certificate, and the key password "
                    "(--kafka-key-password-file / KAFKA_KEY_PASSWORD_FILE) if it has one"
                ) from None
        return context

    def client_options(self) -> dict[str, Any]:
        """The keyword arguments of aiokafka's clients for these settings."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_tls:
            options["ssl_context"] = self.ssl_context
        if self.uses_sasl:
            assert self.sasl_password is not None  # checked in __post_init__
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password.reveal()
        return options

    def describe(self) -> str:
        """One line for logs: what is used, never a password."""
        parts = [self.protocol]
        if self.uses_tls:
            parts.append(f"CA {self.ca_file or 'system store'}")
            if self.cert_file:
                parts.append(f"client certificate {self.cert_file}")
            if not self.check_hostname:
                parts.append("hostname NOT checked")
        if self.uses_sasl:
            parts.append(f"{self.sasl_mechanism} as {self.sasl_username!r}")
        return ", ".join(parts)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc.library or 'ssl'})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def read_secret_file(path: str, what: str) -> Secret:
    """The file's content without its final line break; refuses an empty or huge file."""
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise KafkaConfigError(
            f"cannot read the {what} file {path}: {_reason(exc)}; "
            "check the path and that this user may read it"
        ) from None
    if len(data) > _MAX_SECRET_BYTES:
        raise KafkaConfigError(f"the {what} file {path} is larger than 64 KiB: not a password")
    text = data.decode("utf-8", "replace").removesuffix("\n").removesuffix("\r")
    if not text:
        raise KafkaConfigError(f"the {what} file {path} is empty")
    return Secret(text)


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """The TLS and SASL flags; each falls back to the KAFKA_* variable named in its help."""
    group = parser.add_argument_group(
        "Kafka security", "TLS and SASL; each flag falls back to the environment variable shown"
    )
    group.add_argument(
        "--kafka-security-protocol",
        choices=PROTOCOLS,
        type=str.upper,
        default=None,
        help="KAFKA_SECURITY_PROTOCOL (default: SASL_SSL with SASL settings, SSL with TLS "
        "files, else PLAINTEXT)",
    )
    group.add_argument(
        "--kafka-ca-file",
        metavar="PEM",
        help="KAFKA_CA_FILE: CA certificates that sign the brokers' (default: the system store)",
    )
    group.add_argument(
        "--kafka-cert-file", metavar="PEM", help="KAFKA_CERT_FILE: client certificate"
    )
    group.add_argument("--kafka-key-file", metavar="PEM", help="KAFKA_KEY_FILE: its private key")
    group.add_argument(
        "--kafka-key-password-file",
        metavar="FILE",
        help=f"KAFKA_KEY_PASSWORD_FILE (or {KEY_PASSWORD_ENV}): password of an encrypted key",
    )
    group.add_argument(
        "--kafka-no-check-hostname",
        action="store_true",
        default=None,
        help=f"{CHECK_HOSTNAME_ENV}=false: accept a broker certificate issued for another name "
        "(still signed by the CA); for tests only",
    )
    group.add_argument(
        "--kafka-sasl-mechanism",
        choices=SASL_MECHANISMS,
        type=str.upper,
        default=None,
        help="KAFKA_SASL_MECHANISM",
    )
    group.add_argument("--kafka-sasl-username", metavar="NAME", help="KAFKA_SASL_USERNAME")
    group.add_argument(
        "--kafka-sasl-password-file",
        metavar="FILE",
        help=f"KAFKA_SASL_PASSWORD_FILE (or {SASL_PASSWORD_ENV}): the SASL password",
    )


def security_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> KafkaSecurity:
    """Flags first, then the environment; files read and the TLS context built here."""
    env = os.environ if environ is None else environ

    def setting(dest: str) -> str | None:
        value = getattr(args, dest, None)
        return value if value else (env.get(ENVIRONMENT[dest]) or None)

    protocol = setting("kafka_security_protocol")
    mechanism = setting("kafka_sasl_mechanism")
    key_password = _password(
        setting("kafka_key_password_file"), env.get(KEY_PASSWORD_ENV), "Kafka key password"
    )
    sasl_password = _password(
        setting("kafka_sasl_password_file"), env.get(SASL_PASSWORD_ENV), "Kafka SASL password"
    )
    username = setting("kafka_sasl_username")
    ca, cert, key = setting("kafka_ca_file"), setting("kafka_cert_file"), setting("kafka_key_file")
    if protocol is None:
        tls = "SSL" if (ca or cert or key) else None
        protocol = "SASL_SSL" if (mechanism or username or sasl_password) else tls or "PLAINTEXT"
    for path in (ca, cert, key):
        if path and not Path(path).is_file():
            raise KafkaConfigError(
                f"Kafka TLS file {path} does not exist (or is not a file): check the path "
                "given in --kafka-ca-file / --kafka-cert-file / --kafka-key-file or KAFKA_*_FILE"
            )
    return KafkaSecurity(
        protocol=protocol.upper(),
        ca_file=ca,
        cert_file=cert,
        key_file=key,
        key_password=key_password,
        check_hostname=_check_hostname(args, env),
        sasl_mechanism=mechanism.upper() if mechanism else None,
        sasl_username=username,
        sasl_password=sasl_password,
    )


def _password(path: str | None, value: str | None, what: str) -> Secret | None:
    if path:
        return read_secret_file(path, what)
    return Secret(value) if value else None


def _check_hostname(args: argparse.Namespace, env: Mapping[str, str]) -> bool:
    if getattr(args, "kafka_no_check_hostname", None):
        return False
    raw = env.get(CHECK_HOSTNAME_ENV, "").strip().lower()
    if not raw or raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise KafkaConfigError(
        f"{CHECK_HOSTNAME_ENV}={env[CHECK_HOSTNAME_ENV]!r} is neither true nor false"
    )
