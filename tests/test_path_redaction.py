"""Secrets in URL paths never leave the node: the redactor alone, then the real agent.

The agent test sends requests whose paths carry a token, an e-mail address, a UUID and a
query string to a Go server under the real agent, reads every message of apm.uprobe.events
as raw bytes, and finds none of those secrets there, only the placeholder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from agent_harness import Agent, go_server, read_spans
from kafka_fixtures import read_topic

from ebpf_apm.kafka.embedded_broker import EmbeddedBroker
from ebpf_apm.producer import agent_command
from ebpf_apm.producer.errors import TargetError
from ebpf_apm.producer.path_redaction import PLACEHOLDER, PathRedactor

R = PLACEHOLDER
TOKEN = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"  # 32 characters of an API-key shape
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)


@pytest.mark.parametrize(
    ("path", "redacted"),
    [
        (f"/api/keys/{TOKEN}", f"/api/keys/{R}"),
        ("/users/jane.doe+shop@example.co.uk/orders", f"/users/{R}/orders"),
        ("/items/123e4567-e89b-12d3-a456-426614174000", f"/items/{R}"),
        ("/blobs/3f2a9c0d1e4b5a6f", f"/blobs/{R}"),  # 16 hex digits
        (f"/reset/{JWT}", f"/reset/{R}"),
        ("/search?q=secret&token=abc", "/search"),  # query strings never leave
        # Left alone: ordinary routes, ids, short hex, long words, file names.
        ("/api/user/12345", "/api/user/12345"),
        ("/api/user/12345/", "/api/user/12345/"),
        ("/commits/3f2a9c0", "/commits/3f2a9c0"),
        ("/getUserAccountSettingsPage", "/getUserAccountSettingsPage"),
        ("/static/report.final.pdf", "/static/report.final.pdf"),
        ("/", "/"),
        ("", ""),
    ],
)
def test_default_patterns(path: str, redacted: str) -> None:
    assert PathRedactor().redact(path) == redacted


def test_own_patterns_and_defaults_off() -> None:
    own = PathRedactor([r"[0-9]{5,}", r"acct-.*"])
    assert own.redact("/api/user/12345/acct-77/x") == f"/api/user/{R}/{R}/x"
    assert own.redact(f"/k/{TOKEN}") == f"/k/{R}"  # defaults still on
    off = PathRedactor([r"acct-.*"], defaults=False)
    assert off.redact(f"/k/{TOKEN}/acct-1?x=1") == f"/k/{TOKEN}/{R}"
    assert PathRedactor(defaults=False).redact("/a@b.c?q") == "/a@b.c"


def test_a_bad_pattern_is_refused_with_what_to_do() -> None:
    parser = argparse.ArgumentParser()
    agent_command.add_arguments(parser)
    args = parser.parse_args(["--pid", "1", "--redact-path", "([a-z"])
    with pytest.raises(TargetError, match=r"--redact-path '\(\[a-z' is not a regular expression"):
        agent_command.config_from_args(args)


@pytest.mark.bpf
@pytest.mark.integration
def test_a_token_in_a_url_never_reaches_kafka(
    go_targets: dict[tuple[str, bool], Path], tmp_path: Path
) -> None:
    secrets = [TOKEN, "jane@example.com", "123e4567-e89b-12d3-a456-426614174000", "hunter2"]
    paths = [
        f"/sleep/{TOKEN}?ms=1",
        "/sleep/jane@example.com?ms=1&password=hunter2",
        "/deep/123e4567-e89b-12d3-a456-426614174000?depth=10&ms=1",
        "/sleep/acct-991?ms=1",
    ]
    with EmbeddedBroker() as broker, go_server(go_targets[("1.27", False)]) as server:
        bootstrap = broker.bootstrap_servers
        flags = ["--pid", str(server.pid), "--bootstrap-servers", bootstrap]
        with Agent([*flags, "--redact-path", "acct-[0-9]+"]) as agent:
            agent.wait_ready()
            for path in paths:
                status, _ = server.get(path)
                assert status == 200, path
            spans = read_spans(bootstrap, server.pid, len(paths))
            assert agent.stop() == 0, agent.log
        # Every message of the topic (more than there are: reads until the timeout).
        raw = asyncio.run(read_topic(bootstrap, "apm.uprobe.events", 10**6, timeout_s=3))
    http = sorted(s["http_path"] for s in spans if s.get("http_path"))
    assert http == sorted([f"/sleep/{R}", f"/sleep/{R}", f"/deep/{R}", f"/sleep/{R}"]), spans
    everything = b"".join((r.value or b"") + (r.key or b"") for r in raw)
    assert everything and f"/sleep/{R}".encode() in everything
    for secret in secrets:
        assert secret.encode() not in everything, secret
        assert secret not in agent.log
        assert secret not in json.dumps(spans)
