"""Flags over the standard OTEL_EXPORTER_OTLP_* environment, as the OTLP exporter
specification defines them; bad values are refused with the variable's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebpf_apm.consumers.errors import ConsumerConfigError
from ebpf_apm.consumers.otlp_client import Backoff, retry_after_seconds
from ebpf_apm.consumers.otlp_settings import resolve


def test_defaults_are_the_otlp_ones() -> None:
    http = resolve(environ={})
    assert (http.protocol, http.url, http.compression, http.timeout_s) == (
        "http/protobuf",
        "http://localhost:4318/v1/traces",
        "none",
        10.0,
    )
    grpc = resolve(protocol="grpc", environ={})
    assert grpc.url == "http://localhost:4317" and grpc.grpc_target == "localhost:4317"


def test_the_base_endpoint_gets_the_signal_path_and_the_traces_endpoint_is_used_as_is() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example:4318/prefix/"}
    assert resolve(environ=env).url == "https://otel.example:4318/prefix/v1/traces"
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://tempo:4318/custom"
    assert resolve(environ=env).url == "http://tempo:4318/custom"
    assert resolve(endpoint="http://c:4318", environ=env).url == "http://c:4318/v1/traces"
    assert resolve(endpoint="http://c:9/v1/traces", environ=env).url == "http://c:9/v1/traces"


def test_grpc_endpoints_and_tls() -> None:
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "otel:4317"}
    secure = resolve(environ=env)
    assert secure.url == "https://otel:4317" and secure.tls
    env["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
    assert resolve(environ=env).url == "http://otel:4317"
    assert resolve(protocol="http/protobuf", endpoint="http://x:1", environ=env).protocol == (
        "http/protobuf"
    )


def test_headers_timeout_and_compression_with_traces_variants_winning() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc, x-tenant=a",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-tenant=b",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
    }
    settings = resolve(environ=env, headers=["x-extra=1"])
    assert dict(settings.headers) == {
        "authorization": "Bearer abc",
        "x-tenant": "b",
        "x-extra": "1",
    }
    assert settings.timeout_s == 2.5 and settings.compression == "gzip"
    assert resolve(environ=env, timeout_ms=100, compression="none").timeout_s == 0.1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "JSON is not supported"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "udp"}, "unknown OTLP protocol 'udp'"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "has no scheme"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://c/x"}, "not an http:// or https://"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS: header"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TIMEOUT: timeout 'soon'"),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "unknown compression 'zstd'"),
        ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent.pem"}, "no such file"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConsumerConfigError, match=message):
        resolve(environ=env)


def test_certificates_are_read_from_the_environment(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    settings = resolve(environ={"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(ca)})
    assert settings.certificate == str(ca)


def test_backoff_doubles_with_jitter_up_to_the_cap_and_retry_after_wins() -> None:
    backoff = Backoff(0.5, 4.0)
    for attempt, ceiling in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        delays = [backoff.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jitter
    assert backoff.delay(3, retry_after_s=7.0) == 7.0
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("whenever") is None
