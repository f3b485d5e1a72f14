"""Where and how `ebpf-apm export` sends traces: flags, else the standard OTLP environment.

    --otlp-endpoint / --protocol / --otlp-header / --otlp-timeout / --otlp-compression
      > OTEL_EXPORTER_OTLP_TRACES_*  > OTEL_EXPORTER_OTLP_*  > the OTLP defaults

The environment variables mean what the OpenTelemetry specification says they mean
(https://opentelemetry.io/docs/specs/otel/protocol/exporter/), so a deployment that already
configures an SDK exporter configures this one too:

- ENDPOINT: a base URL; for http/protobuf `/v1/traces` is appended to its path. The TRACES_
  variant (and `--otlp-endpoint` when it has a path) is the full URL, used as it is. For grpc,
  the scheme chooses TLS (`https`) or plain text (`http`); `host:port` without a scheme is TLS
  unless INSECURE is true.
- PROTOCOL: `http/protobuf` (the default) or `grpc`; `http/json` is refused with a message.
- HEADERS: `key=value,key2=value2`, values percent-decoded (W3C baggage style).
- TIMEOUT: milliseconds per export request (default 10000).
- COMPRESSION: `gzip` or `none` (the default).
- CERTIFICATE, CLIENT_CERTIFICATE, CLIENT_KEY: PEM files for the server's CA and mutual TLS.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ebpf_apm.consumers.errors import ConsumerConfigError

HTTP_PROTOBUF = "http/protobuf"
GRPC = "grpc"
PROTOCOLS = (HTTP_PROTOBUF, GRPC)
COMPRESSIONS = ("gzip", "none")
DEFAULT_ENDPOINTS = {HTTP_PROTOBUF: "http://localhost:4318", GRPC: "http://localhost:4317"}
TRACES_PATH = "/v1/traces"
DEFAULT_TIMEOUT_MS = 10_000
PREFIX = "OTEL_EXPORTER_OTLP_"
TRACES_PREFIX = "OTEL_EXPORTER_OTLP_TRACES_"


@dataclass(frozen=True)
class OtlpSettings:
    """One resolved exporter configuration; `url` is what requests go to.

    http/protobuf: the full URL of the traces resource. grpc: `http(s)://host:port`."""

    protocol: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_MS / 1000
    compression: str = "none"
    certificate: str | None = None
    client_certificate: str | None = None
    client_key: str | None = None
    insecure: bool = False
    sources: Mapping[str, str] = field(default_factory=dict)  # setting -> where it came from

    @property
    def tls(self) -> bool:
        return self.url.startswith("https://")

    @property
    def grpc_target(self) -> str:
        """host:port for grpc.aio channels."""
        return urllib.parse.urlsplit(self.url).netloc

    def ssl_context(self) -> ssl.SSLContext | None:
        """For https URLs: the system CAs, or CERTIFICATE's, plus the client pair if given."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.certificate)
        if self.client_certificate:
            context.load_cert_chain(self.client_certificate, self.client_key)
        return context

    def describe(self) -> str:
        return f"{self.protocol} to {self.url}"


def _lookup(
    name: str, flag: str | None, environ: Mapping[str, str], sources: dict[str, str]
) -> str | None:
    """The flag, else OTEL_EXPORTER_OTLP_TRACES_<name>, else OTEL_EXPORTER_OTLP_<name>."""
    if flag is not None:
        sources[name] = "flag"
        return flag
    for prefix in (TRACES_PREFIX, PREFIX):
        value = environ.get(prefix + name)
        if value is not None and value.strip():
            sources[name] = prefix + name
            return value.strip()
    return None


def parse_headers(text: str, where: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k2=v%202` -> (("k", "v"), ("k2", "v 2")); keys lower-cased (HTTP/2 and gRPC
    metadata require it)."""
    headers = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = urllib.parse.unquote(key.strip()).lower()
        if not sep or not key:
            raise ConsumerConfigError(
                f"{where}: header {item.strip()!r} is not key=value; write e.g. "
                "'authorization=Bearer%20TOKEN,x-tenant=a' (values percent-encoded)"
            )
        headers.append((key, urllib.parse.unquote(value.strip())))
    return tuple(headers)


def _endpoint_url(protocol: str, raw: str | None, source: str, full: bool) -> str:
    if raw is None:
        raw, full = DEFAULT_ENDPOINTS[protocol], False
    if "://" not in raw:
        if protocol == HTTP_PROTOBUF:
            raise ConsumerConfigError(
                f"{source}: endpoint {raw!r} has no scheme; write http://HOST:PORT or "
                "https://HOST:PORT"
            )
        raw = "https://" + raw  # grpc: host:port; TLS unless insecure (decided by the caller)
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConsumerConfigError(
            f"{source}: endpoint {raw!r} is not an http:// or https:// URL with a host"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConsumerConfigError(f"{source}: endpoint {raw!r} has a bad port") from None
    if protocol == GRPC:
        default_port = 443 if parts.scheme == "https" else 80
        netloc = parts.netloc if port else f"{parts.netloc}:{default_port}"
        return f"{parts.scheme}://{netloc}"
    path = parts.path
    if not full:  # a base URL: the signal's path goes under it
        path = path.rstrip("/") + TRACES_PATH
    elif not path:
        path = "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _bool(text: str | None) -> bool:
    return (text or "").strip().lower() == "true"


def resolve(
    *,
    endpoint: str | None = None,
    protocol: str | None = None,
    headers: Sequence[str] = (),
    timeout_ms: int | None = None,
    compression: str | None = None,
    insecure: bool = False,
    environ: Mapping[str, str] | None = None,
) -> OtlpSettings:
    """Flags (None: not given) over the environment; raises ConsumerConfigError on bad values."""
    env = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    chosen = _lookup("PROTOCOL", protocol, env, sources) or HTTP_PROTOBUF
    if chosen not in PROTOCOLS:
        hint = " (JSON is not supported: use http/protobuf)" if chosen == "http/json" else ""
        raise ConsumerConfigError(
            f"{sources.get('PROTOCOL', 'protocol')}: unknown OTLP protocol {chosen!r}{hint}; "
            f"choose one of {', '.join(PROTOCOLS)}"
        )
    # The endpoint: the flag (a full URL if it has a path), else TRACES_ENDPOINT (full URL),
    # else ENDPOINT (a base URL).
    if endpoint is not None:
        raw, source = endpoint, "--otlp-endpoint"
        full = urllib.parse.urlsplit(endpoint).path not in ("", "/")
    elif env.get(TRACES_PREFIX + "ENDPOINT", "").strip():
        source, full = TRACES_PREFIX + "ENDPOINT", True
        raw = env[source].strip()
    elif env.get(PREFIX + "ENDPOINT", "").strip():
        source, full = PREFIX + "ENDPOINT", False
        raw = env[source].strip()
    else:
        raw, source, full = None, "default", False
    sources["ENDPOINT"] = source
    insecure = insecure or _bool(_lookup("INSECURE", None, env, sources))
    if chosen == GRPC and raw is not None and "://" not in raw and insecure:
        raw = "http://" + raw
    url = _endpoint_url(chosen, raw, source, full)

    header_pairs: list[tuple[str, str]] = []
    for name in (PREFIX + "HEADERS", TRACES_PREFIX + "HEADERS"):  # the traces ones win
        if env.get(name, "").strip():
            header_pairs.extend(parse_headers(env[name], name))
    for header in headers:
        header_pairs.extend(parse_headers(header, "--otlp-header"))
    merged = dict(header_pairs)

    timeout_text = str(timeout_ms) if timeout_ms is not None else None
    timeout_text = _lookup("TIMEOUT", timeout_text, env, sources)
    try:
        timeout = int(timeout_text) if timeout_text is not None else DEFAULT_TIMEOUT_MS
    except ValueError:
        timeout = -1
    if timeout <= 0:
        raise ConsumerConfigError(
            f"{sources.get('TIMEOUT')}: timeout {timeout_text!r} is not a positive number of "
            "milliseconds (e.g. 10000)"
        )
    chosen_compression = (_lookup("COMPRESSION", compression, env, sources) or "none").lower()
    if chosen_compression not in COMPRESSIONS:
        raise ConsumerConfigError(
            f"{sources.get('COMPRESSION')}: unknown compression {chosen_compression!r}; "
            "choose gzip or none"
        )
    files = {}
    for name in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"):
        path = _lookup(name, None, env, sources)
        if path is not None and not os.path.isfile(path):
            raise ConsumerConfigError(f"{sources[name]}: no such file {path!r}")
        files[name] = path
    return OtlpSettings(
        protocol=chosen,
        url=url,
        headers=tuple(merged.items()),
        timeout_s=timeout / 1000,
        compression=chosen_compression,
        certificate=files["CERTIFICATE"],
        client_certificate=files["CLIENT_CERTIFICATE"],
        client_key=files["CLIENT_KEY"],
        insecure=insecure,
        sources=sources,
    )
