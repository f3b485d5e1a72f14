"""Targets by selector, end to end up to the agent's attach call: real processes in real
cgroups shaped like a container runtime's, in their own PID and mount namespaces, found by
the exec tracepoint (BPF), named by an API server on 127.0.0.1, matched by a targets file."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cgroup_fixtures import Cgroups, cgroups_fixture, child_of  # noqa: F401
from fake_kube_api import FakeKubeApi, make_pod

from ebpf_apm.producer.errors import TargetError
from ebpf_apm.producer.k8s_metadata import KubeApiConfig, PodMetadata
from ebpf_apm.producer.process_discovery import ProcessDiscovery
from ebpf_apm.producer.target_rules import parse_target_rules
from ebpf_apm.producer.target_tracker import TargetTracker, TrackedProcess

pytestmark = [
    pytest.mark.bpf,
    pytest.mark.skipif(os.geteuid() != 0, reason="BPF, cgroups and namespaces need root"),
]

NODE = "node-a"
TARGETS = """\
targets:
  - name: checkout
    select:
      namespaces: [shop]
      podSelector:
        matchLabels: {app: checkout}
      exeNames: [server]
    functions: [main.handle]
  - name: outside
    select:
      exeNames: ["outside-*"]
    http: true
"""


def _binary(directory: Path, name: str) -> Path:
    sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    path = directory / name
    shutil.copy2(sleep, path)
    return path


def _in_container(cgroup: Path, binary: Path) -> subprocess.Popen[bytes]:
    """`binary 30` as pid 1 of new PID and mount namespaces, inside `cgroup`."""
    return subprocess.Popen(
        [
            "sh",
            "-c",
            f"echo $$ > {cgroup}/cgroup.procs && "
            f"exec unshare --pid --mount --fork --kill-child --mount-proc {binary} 30",
        ]
    )


def test_selected_processes_are_attached_named_and_detached(
    cgroups: Cgroups, tmp_path: Path
) -> None:
    checkout_uid, other_uid, late_uid = (str(uuid.uuid4()) for _ in range(3))
    checkout_cid, other_cid, late_cid = (os.urandom(32).hex() for _ in range(3))
    checkout_cg = cgroups.make(
        "kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{checkout_uid.replace('-', '_')}.slice/"
        f"cri-containerd-{checkout_cid}.scope"
    )
    other_cg = cgroups.make(f"kubepods/besteffort/pod{other_uid}/{other_cid}")
    late_cg = cgroups.make(f"kubepods/pod{late_uid}/{late_cid}")
    server = _binary(tmp_path, "server")
    outside = _binary(tmp_path, "outside-app")
    unrelated = _binary(tmp_path, "unrelated")

    api = FakeKubeApi()
    checkout_labels = {"app": "checkout", "pod-template-hash": "6d5f7c9b8"}
    api.add_pod(
        make_pod(
            "checkout-6d5f7c9b8-x2x7k",
            checkout_uid,
            labels=checkout_labels,
            owner=("ReplicaSet", "checkout-6d5f7c9b8"),
            containers=[("server", checkout_cid)],
        )
    )
    api.add_pod(
        make_pod("other-0", other_uid, labels={"app": "other"}, containers=[("server", other_cid)])
    )
    # Known pod whose status does not list the container yet (the kubelet is late).
    late_pod = make_pod(
        "checkout-6d5f7c9b8-late1",
        late_uid,
        labels=checkout_labels,
        owner=("ReplicaSet", "checkout-6d5f7c9b8"),
        containers=[("server", None)],
    )
    api.add_pod(late_pod)

    attached: dict[int, tuple[float, TrackedProcess]] = {}
    detached: dict[int, float] = {}
    updated: list[TrackedProcess] = []

    def on_attach(process: TrackedProcess) -> None:
        if process.exe.endswith("/unrelated"):
            raise TargetError("never selected, so never attached")
        attached[process.pid] = (time.monotonic(), process)

    async def scenario() -> None:
        await api.start()
        metadata = PodMetadata(
            NODE, KubeApiConfig(api.url), backoff_initial_s=0.02, backoff_max_s=0.2
        )
        tracker = TargetTracker(
            parse_target_rules(TARGETS),
            on_attach,
            lambda pid: detached.setdefault(pid, time.monotonic()),
            metadata,
            on_update=updated.append,
        )
        discovery = ProcessDiscovery(tracker.on_process_event, poll_interval_s=0.1)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            await metadata.start()
            assert await metadata.wait_synced(5)
            await discovery.start()
            started = time.monotonic()
            procs.append(_in_container(checkout_cg, server))
            procs.append(_in_container(other_cg, server))
            procs.append(subprocess.Popen([str(outside), "30"]))
            procs.append(subprocess.Popen([str(unrelated), "30"]))
            checkout_pid = await asyncio.to_thread(child_of, procs[0].pid)
            other_pid = await asyncio.to_thread(child_of, procs[1].pid)
            outside_pid = procs[2].pid
            deadline = time.monotonic() + 3
            while {checkout_pid, outside_pid} - set(attached) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            # Selected ones only, each within a second of its start.
            assert set(attached) == {checkout_pid, outside_pid}
            assert other_pid not in attached and procs[3].pid not in attached
            for pid in (checkout_pid, outside_pid):
                assert attached[pid][0] - started < 1.0
            checkout = attached[checkout_pid][1]
            assert checkout.exe == str(server) and checkout.request.functions == ("main.handle",)
            assert checkout.event_fields() == {
                "k8s_namespace": "shop",
                "k8s_pod": "checkout-6d5f7c9b8-x2x7k",
                "k8s_container": "server",
                "k8s_workload": "deployment/checkout",
            }
            assert attached[outside_pid][1].event_fields() is None
            assert attached[outside_pid][1].request.http

            # A container the API has not reported yet: attached at once (the rules need
            # only the pod's namespace and labels), named when the kubelet reports it.
            late_started = time.monotonic()
            procs.append(_in_container(late_cg, server))
            late_pid = await asyncio.to_thread(child_of, procs[-1].pid)
            while late_pid not in attached and time.monotonic() - late_started < 3:
                await asyncio.sleep(0.02)
            assert attached[late_pid][0] - late_started < 1.0
            assert attached[late_pid][1].k8s is not None
            assert attached[late_pid][1].event_fields()["k8s_container"] is None  # type: ignore[index]
            api.modify_pod(
                make_pod(
                    "checkout-6d5f7c9b8-late1",
                    late_uid,
                    labels=checkout_labels,
                    owner=("ReplicaSet", "checkout-6d5f7c9b8"),
                    containers=[("server", late_cid)],
                )
            )
            while not updated and time.monotonic() - late_started < 5:
                await asyncio.sleep(0.02)
            assert [u.pid for u in updated] == [late_pid]
            assert updated[0].event_fields()["k8s_container"] == "server"  # type: ignore[index]
            assert tracker.tracked[late_pid].k8s == updated[0].k8s

            # Exits detach, within a second.
            ended = time.monotonic()
            for proc in procs:
                proc.kill()
            for proc in procs:
                await asyncio.to_thread(proc.wait)
            while set(attached) - set(detached) and time.monotonic() - ended < 3:
                await asyncio.sleep(0.02)
            assert set(detached) == set(attached)
            assert max(detached.values()) - ended < 1.0
            assert tracker.tracked == {} and tracker.pending == 0
            assert metadata.pending_waiters == 0
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            await discovery.stop()
            await tracker.stop()
            await metadata.stop()
            await api.stop()

    asyncio.run(scenario())
