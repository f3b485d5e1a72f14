"""Transport security of every Kafka client: TLS and SASL settings from flags and the
environment, passwords that never print, and the pipeline over TLS end to end.

The broker side is real: Tansu behind stunnel4 (tests/tls_fixtures.py), with certificates
the test makes. Tansu has no SASL; the SASL tests show the settings reach the broker (its
answer to the SASL handshake for the configured mechanism) and that the refusal is reported
as what it is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_harness import Agent, go_server, plan_requests, send_concurrently
from aiokafka.errors import KafkaConnectionError
from join_harness import start_join, stop_service, wait_for
from tls_fixtures import BROKER_NAME, KEY_PASSWORD, Pki, Stunnel, make_pki, tls_broker

from ebpf_apm.consumers.latency_store import StorageError, open_store
from ebpf_apm.kafka.admin import ensure_topics
from ebpf_apm.kafka.clients import new_consumer
from ebpf_apm.kafka.connection import (
    KafkaConnection,
    add_connection_arguments,
    connection_from_args,
)
from ebpf_apm.kafka.embedded_broker import EmbeddedBroker, free_port
from ebpf_apm.kafka.errors import KafkaConfigError, KafkaUnavailableError
from ebpf_apm.kafka.security import KafkaSecurity, Secret, security_from_args

REPO = Path(__file__).resolve().parent.parent
KAFKA_COMMANDS = ("agent", "join", "aggregate", "alert", "tail")
SASL_PASSWORD = "s3cret-never-printed"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def no_kafka_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the KAFKA_* variables they mean; none leak in from the caller's shell."""
    for name in list(os.environ):
        if name.startswith("KAFKA_"):
            monkeypatch.delenv(name)


def parse(argv: list[str], env: dict[str, str] | None = None) -> KafkaConnection:
    parser = argparse.ArgumentParser()
    add_connection_arguments(parser)
    args = parser.parse_args(argv)
    return KafkaConnection("localhost:9093", security_from_args(args, env or {}))


def mtls_env(pki: Pki) -> dict[str, str]:
    return {
        "KAFKA_CA_FILE": str(pki.ca),
        "KAFKA_CERT_FILE": str(pki.client_cert),
        "KAFKA_KEY_FILE": str(pki.client_key),
        "KAFKA_KEY_PASSWORD_FILE": str(pki.key_password_file),
    }


# --- settings ------------------------------------------------------------------------------


def test_settings_from_flags_and_environment(pki: Pki, tmp_path: Path) -> None:
    assert parse([]).security == KafkaSecurity()  # nothing given: PLAINTEXT, as before
    assert parse([]).client_options() == {
        "bootstrap_servers": "localhost:9093",
        "security_protocol": "PLAINTEXT",
    }
    # TLS files alone mean SSL; the key password file's final line break is not part of it.
    mtls = parse([], mtls_env(pki)).security
    assert (mtls.protocol, mtls.check_hostname, mtls.key_password) == (
        "SSL",
        True,
        Secret(KEY_PASSWORD),
    )
    assert mtls.ssl_context is not None and mtls.ssl_context.check_hostname
    # Flags win over the environment; SASL settings mean SASL_SSL unless told otherwise.
    password_file = tmp_path / "sasl-password"
    password_file.write_text(SASL_PASSWORD + "\r\n")
    flags = ["--kafka-ca-file", str(pki.ca), "--kafka-sasl-mechanism", "scram-sha-256"]
    flags += ["--kafka-sasl-username", "apm-join", "--kafka-sasl-password-file", str(password_file)]
    env = {"KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_PASSWORD": "from-env"}
    connection = parse(flags, env)
    options = connection.client_options()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["ssl_context"] is connection.security.ssl_context
    assert (options["sasl_mechanism"], options["sasl_plain_username"]) == (
        "SCRAM-SHA-256",
        "apm-join",
    )
    assert options["sasl_plain_password"] == SASL_PASSWORD
    # The password from the environment when no file is named; hostname check switchable.
    env = {"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_MECHANISM": "PLAIN"}
    env |= {"KAFKA_SASL_PASSWORD": "from-env", "KAFKA_SECURITY_PROTOCOL": "sasl_plaintext"}
    plain = parse([], env).security
    assert (plain.protocol, plain.sasl_password) == ("SASL_PLAINTEXT", Secret("from-env"))
    assert parse([], {**mtls_env(pki), "KAFKA_CHECK_HOSTNAME": "false"}).security.ssl_context
    assert not parse(["--kafka-no-check-hostname"], mtls_env(pki)).security.check_hostname


def test_passwords_never_print(pki: Pki) -> None:
    env = {"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"}
    env |= {"KAFKA_SASL_PASSWORD": SASL_PASSWORD, **mtls_env(pki)}
    connection = parse([], env)
    for text in (repr(connection), str(connection), connection.security.describe()):
        assert SASL_PASSWORD not in text and KEY_PASSWORD not in text, text
    assert "Secret('***')" in repr(connection)
    assert connection.security.describe() == (
        f"SASL_SSL, CA {pki.ca}, client certificate {pki.client_cert}, SCRAM-SHA-512 as 'u'"
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"KAFKA_CA_FILE": "/nonexistent/ca.pem"}, "Kafka TLS file /nonexistent/ca.pem does not"),
        ({"KAFKA_CERT_FILE": "{client_cert}"}, "needs both --kafka-cert-file and --kafka-key"),
        (
            {"KAFKA_CA_FILE": "{ca}", "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"},
            "is PLAINTEXT, which has no TLS: use SSL or SASL_SSL",
        ),
        (
            {"KAFKA_CERT_FILE": "{client_cert}", "KAFKA_KEY_FILE": "{client_key}",
             "KAFKA_KEY_PASSWORD": "wrong"},
            "cannot load the Kafka client certificate",
        ),
        ({"KAFKA_CA_FILE": "{client_key}"}, "cannot load the Kafka CA file"),
        ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "SASL needs a mechanism"),
        ({"KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "u"}, "SASL needs a password"),
        (
            {"KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SECURITY_PROTOCOL": "SSL"},
            "SASL settings were given but the Kafka security protocol is SSL",
        ),
        ({"KAFKA_SASL_PASSWORD_FILE": "{empty}"}, "is empty"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "unknown Kafka security protocol 'TLS'"),
        ({"KAFKA_CHECK_HOSTNAME": "maybe"}, "KAFKA_CHECK_HOSTNAME='maybe' is neither"),
    ],
)  # fmt: skip
def test_bad_settings_say_what_is_wrong(
    pki: Pki, tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    files = {"ca": pki.ca, "client_cert": pki.client_cert, "client_key": pki.client_key}
    env = {k: v.format(**files, empty=empty) for k, v in env.items()}
    with pytest.raises(KafkaConfigError) as failure:
        parse([], env)
    assert expected in str(failure.value)
    assert KEY_PASSWORD not in str(failure.value)


def test_every_kafka_command_takes_the_security_flags() -> None:
    """One shared place: each Kafka command's parser has them (query reads storage only)."""
    from ebpf_apm.cli import COMMANDS  # noqa: PLC0415

    for name in KAFKA_COMMANDS:
        module = __import__(COMMANDS[name][0], fromlist=["add_arguments"])
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        dests = {action.dest for action in parser._actions}
        assert {"kafka_security_protocol", "kafka_ca_file", "kafka_cert_file", "kafka_key_file",
                "kafka_key_password_file", "kafka_sasl_mechanism", "kafka_sasl_username",
                "kafka_sasl_password_file", "kafka_no_check_hostname"} <= dests, name  # fmt: skip


# --- against the broker ---------------------------------------------------------------------


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ebpf_apm.cli", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.integration
def test_tls_failures_say_what_to_do(pki: Pki, tmp_path: Path) -> None:
    """Each failure through a real command (`tail`): exit status 1, the cause, the remedy."""
    with tls_broker(pki, tmp_path, require_client_cert=True) as bootstrap:
        port = bootstrap.rsplit(":", 1)[1]
        cases = {
            "wrong CA": (
                bootstrap,
                {**mtls_env(pki), "KAFKA_CA_FILE": str(pki.other_ca)},
                ["the broker's certificate cannot be verified", f"CA of {pki.other_ca}",
                 "give --kafka-ca-file / KAFKA_CA_FILE the CA certificate"],
            ),
            "wrong hostname": (
                f"127.0.0.1:{port}",
                mtls_env(pki),
                ["the broker's certificate is not issued for the name '127.0.0.1'",
                 "connect with a name the certificate lists"],
            ),
            "no client certificate": (
                bootstrap,
                {"KAFKA_CA_FILE": str(pki.ca)},
                ["the broker refused the handshake (TLSV13_ALERT_CERTIFICATE_REQUIRED)",
                 "this client sent no certificate", "give --kafka-cert-file and --kafka-key"],
            ),
            "plaintext client": (
                bootstrap,
                {},
                [f"Kafka at {bootstrap} speaks TLS and this client does not: set "
                 "--kafka-security-protocol SSL"],
            ),
        }  # fmt: skip
        for case, (servers, env, expected) in cases.items():
            started = time.monotonic()
            out = run_cli("tail", "apm.spans", "--bootstrap-servers", servers, env=env)
            assert out.returncode == 1, (case, out.stderr)
            error = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
            assert len(error) == 1, (case, out.stderr)
            for fragment in expected:
                assert fragment in error[0], (case, error[0])
            assert "fix the Kafka security settings" in error[0], error[0]
            assert time.monotonic() - started < 30, case
        # And the right settings work, through the same listener (mutual TLS).
        out = run_cli("tail", "apm.spans", "--timeout", "1", env=mtls_env(pki) | {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap})  # fmt: skip
        assert out.returncode == 1 and "topic 'apm.spans' does not exist" in out.stderr


@pytest.mark.integration
def test_sasl_settings_reach_the_broker_and_its_refusal_is_clear(pki: Pki, tmp_path: Path) -> None:
    """Tansu has no SASL: it answers the SASL handshake UNSUPPORTED_SASL_MECHANISM. The
    commands send the configured mechanism and report the refusal, never the password."""
    password_file = tmp_path / "password"
    password_file.write_text(SASL_PASSWORD)
    with tls_broker(pki, tmp_path, require_client_cert=False) as bootstrap:
        for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            env = {"KAFKA_CA_FILE": str(pki.ca), "KAFKA_SASL_MECHANISM": mechanism,
                   "KAFKA_SASL_USERNAME": "ebpf-apm-join", "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
                   "KAFKA_BOOTSTRAP_SERVERS": bootstrap}  # fmt: skip
            out = run_cli("-v", "join", env=env)  # debug logs too
            assert out.returncode == 1, out.stderr
            assert SASL_PASSWORD not in out.stdout + out.stderr
            assert f"does not offer SASL {mechanism} (UNSUPPORTED_SASL_MECHANISM)" in out.stderr, (
                out.stderr
            )
        # The password from a file, in-process: the same settings reach aiokafka's client.
        args = ["--kafka-sasl-mechanism", "SCRAM-SHA-512", "--kafka-sasl-username", "u"]
        args += ["--kafka-sasl-password-file", str(password_file), "--kafka-ca-file", str(pki.ca)]
        parser = argparse.ArgumentParser()
        add_connection_arguments(parser)
        connection = connection_from_args(
            parser.parse_args(["--bootstrap-servers", bootstrap, *args])
        )

        async def start() -> None:
            consumer = new_consumer(connection, "sasl-check", group_id=None)
            try:
                await consumer.start()
            finally:
                await consumer.stop()

        with pytest.raises(Exception) as failure:
            asyncio.run(start())
        assert "does not offer SASL SCRAM-SHA-512" in str(failure.value)
        assert failure.value.retriable is False  # type: ignore[attr-defined]


@pytest.mark.integration
def test_tls_without_client_certificates(pki: Pki, tmp_path: Path) -> None:
    with tls_broker(pki, tmp_path, require_client_cert=False) as bootstrap:
        assert bootstrap.startswith(f"{BROKER_NAME}:")
        security = KafkaSecurity("SSL", ca_file=str(pki.ca))
        counts = asyncio.run(ensure_topics(KafkaConnection(bootstrap, security), {"t.tls": 3}))
        assert counts == {"t.tls": 3}
        with pytest.raises(KafkaUnavailableError, match="cannot be verified"):
            other = KafkaSecurity("SSL", ca_file=str(pki.other_ca))
            asyncio.run(ensure_topics(KafkaConnection(bootstrap, other), {"t.tls": 3}))


@pytest.mark.integration
def test_a_tls_client_at_a_plaintext_port_and_an_outage_behind_tls(
    pki: Pki, tmp_path: Path, kafka_broker: EmbeddedBroker
) -> None:
    """A TLS client at a plaintext listener is told so. A TLS terminator whose broker is
    down is an outage, not a setting: the error stays the retriable "cannot reach"."""
    security = KafkaSecurity("SSL", ca_file=str(pki.ca), check_hostname=False)
    with pytest.raises(KafkaUnavailableError) as failure:
        plain = KafkaConnection(kafka_broker.bootstrap_servers, security)
        asyncio.run(ensure_topics(plain, {}, timeout_s=5))
    assert "it is a plaintext Kafka listener; use the broker's TLS listener" in str(failure.value)
    stunnel = Stunnel(pki, free_port(), tmp_path, require_client_cert=False)
    try:
        behind = KafkaConnection(f"{BROKER_NAME}:{stunnel.port}", security)
        with pytest.raises(KafkaUnavailableError) as failure:
            asyncio.run(ensure_topics(behind, {}, timeout_s=5))
    finally:
        stunnel.stop()
    assert "Unable to bootstrap" in str(failure.value), failure.value
    assert "TLS" not in str(failure.value) and "start one with `ebpf-apm broker`" in str(
        failure.value
    )
    assert isinstance(failure.value.__cause__, KafkaConnectionError)
    assert failure.value.__cause__.retriable


# --- the pipeline over mutual TLS ----------------------------------------------------------


def stored_count(storage: str) -> int:
    async def read() -> int:
        store = await open_store(storage, create=False)
        try:
            return sum(row.count for row in await store.rows(0, 1 << 62))
        finally:
            await store.close()

    try:
        return asyncio.run(read())
    except StorageError:  # not created yet
        return 0



@pytest.mark.bpf
@pytest.mark.integration
def test_agent_join_aggregate_over_mutual_tls(
    pki: Pki,
    go_targets: dict[tuple[str, bool], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real Go server under the agent; the agent, join, aggregate and tail reach the broker
    only through stunnel with client certificates (settings from the environment, the key
    encrypted, its password from a file). Every request is joined, stored and tailed."""
    requests = plan_requests(150, seed=9)
    storage = f"sqlite:///{tmp_path / 'latency.sqlite'}"
    join_log, aggregate_log = tmp_path / "join.log", tmp_path / "aggregate.log"
    for name, value in mtls_env(pki).items():
        monkeypatch.setenv(name, value)  # every child process below inherits them
    with (
        tls_broker(pki, tmp_path, require_client_cert=True) as bootstrap,
        go_server(go_targets[("1.27", False)]) as server,
    ):
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        with Agent(["--pid", str(server.pid), "--node-name", "tls-node"]) as agent:
            agent.wait_ready()
            join = start_join(bootstrap, join_log)
            command = [sys.executable, "-m", "ebpf_apm.cli", "aggregate", "--storage", storage,
                       "--window", "2s", "--lateness", "3s", "--idle-timeout", "1s"]  # fmt: skip
            with aggregate_log.open("wb") as out:
                aggregate = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=out)
            try:
                send_concurrently(server, requests, 8)

                def all_stored() -> bool:
                    assert aggregate.poll() is None, aggregate_log.read_text()
                    assert join.poll() is None, join_log.read_text()
                    return stored_count(storage) >= len(requests)

                try:
                    wait_for(all_stored, 60, "the aggregator to store every request")
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc}\njoin:\n{join_log.read_text()}\naggregate:\n"
                        f"{aggregate_log.read_text()}\nagent:\n{agent.log}"
                    ) from None
                tail = run_cli("tail", "apm.spans", "--from-beginning", "--json", "--timeout",
                               "3", env={})  # fmt: skip
            finally:
                stop_service(aggregate, "aggregate", aggregate_log)
                stop_service(join, "join", join_log)
            assert agent.stop() == 0, agent.log
    assert stored_count(storage) == len(requests)
    assert tail.returncode == 0, tail.stderr
    spans = [json.loads(line) for line in tail.stdout.splitlines()]
    assert sorted(s["http_path"] for s in spans) == sorted(r.path for r in requests)
    assert f"Kafka at {bootstrap}: SSL, CA {pki.ca}, client certificate" in agent.log


def test_every_problem_is_named_at_once_by_the_command(pki: Pki) -> None:
    env = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_CERT_FILE": str(pki.client_cert)}
    out = run_cli("tail", "apm.spans", env=env)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: a client certificate needs both --kafka-cert-file and --kafka-key-file "
        "(KAFKA_CERT_FILE / KAFKA_KEY_FILE); only one was given",
        "error: SASL needs a mechanism (--kafka-sasl-mechanism / KAFKA_SASL_MECHANISM), one of "
        "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        "error: SASL needs a user name (--kafka-sasl-username / KAFKA_SASL_USERNAME)",
        "error: SASL needs a password: --kafka-sasl-password-file FILE, KAFKA_SASL_PASSWORD_FILE "
        "or KAFKA_SASL_PASSWORD",
    ]
