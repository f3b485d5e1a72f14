"""The agent as a DaemonSet would run it: `--config` rules, pod names from the API server,
Go servers in container-shaped cgroups with their own PID and mount namespaces.

Real kernel, real broker, real Go servers; the API server is the fake one on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import Agent, read_spans
from cgroup_fixtures import Cgroups, cgroups_fixture, child_of  # noqa: F401
from fake_kube_api import FakeKubeApi, make_pod

pytestmark = [pytest.mark.bpf, pytest.mark.integration]

NODE = "node-a"
HANDLE_SLEEP = "main.(*server).handleSleep"
TARGETS = f"""\
targets:
  - name: checkout
    select:
      namespaces: [shop]
      podSelector:
        matchLabels: {{app: checkout}}
      exeNames: [server]
    functions: ["{HANDLE_SLEEP}"]
    http: true
"""


@pytest.fixture
def kube_api() -> Iterator[FakeKubeApi]:
    """The fake API server on its own event loop thread, so a child agent can reach it."""
    api = FakeKubeApi()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(api.start(), loop).result(10)
    try:
        yield api
    finally:
        asyncio.run_coroutine_threadsafe(api.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class ContainerServer:
    """The Go test server as pid 1 of new PID and mount namespaces inside `cgroup`."""

    def __init__(self, cgroup: Path, binary: Path) -> None:
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec unshare --pid --mount "
             f"--fork --kill-child --mount-proc {binary} -addr 127.0.0.1:0"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.pid = child_of(self.process.pid)  # the server, as the host sees it
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        assert line and line[0] == "LISTEN", line
        self.port = int(line[1].rsplit(":", 1)[1])

    def get(self, path: str) -> int:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # unshare passes it on and waits
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def wait_for_log(agent: Agent, pattern: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, agent.log):
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"no {pattern!r} in the agent's log:\n{agent.log}")


def test_rules_select_pods_name_their_events_and_detach_on_exit(
    go_targets: dict, kafka_broker, kube_api: FakeKubeApi, cgroups: Cgroups, tmp_path: Path
) -> None:
    checkout_uid, other_uid = str(uuid.uuid4()), str(uuid.uuid4())
    checkout_cid, other_cid = os.urandom(32).hex(), os.urandom(32).hex()
    checkout_cg = cgroups.make(
        "kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{checkout_uid.replace('-', '_')}.slice/"
        f"cri-containerd-{checkout_cid}.scope"
    )
    other_cg = cgroups.make(f"kubepods/besteffort/pod{other_uid}/{other_cid}")
    labels = {"app": "checkout", "pod-template-hash": "6d5f7c9b8"}
    kube_api.add_pod(make_pod("checkout-6d5f7c9b8-x2x7k", checkout_uid, labels=labels,
                              owner=("ReplicaSet", "checkout-6d5f7c9b8"),
                              containers=[("server", checkout_cid)]))  # fmt: skip
    kube_api.add_pod(make_pod("other-0", other_uid, labels={"app": "other"},
                              owner=("StatefulSet", "other"),
                              containers=[("server", other_cid)]))  # fmt: skip
    binary = tmp_path / "server"
    shutil.copy2(go_targets[("1.27", True)], binary)
    rules = tmp_path / "targets.yaml"
    rules.write_text(TARGETS)

    args = ["--config", str(rules), "--kube-api", kube_api.url, "--node-name", NODE,
            "--bootstrap-servers", kafka_broker.bootstrap_servers]  # fmt: skip
    with Agent(args) as agent:
        agent.wait_ready()
        checkout = ContainerServer(checkout_cg, binary)
        other = ContainerServer(other_cg, binary)
        try:
            attached = wait_for_log(agent, rf"pid {checkout.pid} \(.*\) selected by checkout", 5)
            assert attached - checkout.started < 1.0, "attached within a second of exec"
            for i in range(7):
                assert checkout.get(f"/sleep/{i}?ms=5") == 200
                assert other.get(f"/sleep/{i}?ms=5") == 200
            spans = read_spans(kafka_broker.bootstrap_servers, checkout.pid, 14)
            assert f"pid {other.pid} (" not in agent.log
        finally:
            checkout.stop()
            other.stop()
        wait_for_log(agent, rf"process {checkout.pid} \(.*\) exited", 5)
        assert agent.process.poll() is None, "with rules the agent outlives its targets"
        assert agent.stop() == 0, agent.log
    assert read_spans(kafka_broker.bootstrap_servers, other.pid, 0, timeout=0) == []
    assert len(spans) == 14
    assert {s["func"] for s in spans} == {HANDLE_SLEEP, "net/http.serverHandler.ServeHTTP"}
    for span in spans:
        assert span["k8s_namespace"] == "shop"
        assert span["k8s_pod"] == "checkout-6d5f7c9b8-x2x7k"
        assert span["k8s_container"] == "server"
        assert span["k8s_workload"] == "deployment/checkout"
        assert span["exe"] == str(binary)
