"""PodMetadata against an API server on 127.0.0.1 that speaks the real list and watch."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fake_kube_api import FakeKubeApi, make_pod

from ebpf_apm.producer.k8s_metadata import (
    KubeApiConfig,
    KubernetesError,
    PodInfo,
    PodMetadata,
    workload_of,
)

NODE = "node-a"


def cid() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def uid() -> str:
    return str(uuid.uuid4())


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def run(
    scenario: Callable[[FakeKubeApi, PodMetadata], Awaitable[None]],
    api: FakeKubeApi | None = None,
    **options: Any,
) -> None:
    async def main() -> None:
        server = api or FakeKubeApi()
        await server.start()
        settings = {"backoff_initial_s": 0.02, "backoff_max_s": 0.2} | options
        config = KubeApiConfig(
            server.url,
            token_file=settings.pop("token_file", None),
            ca_file=settings.pop("ca_file", None),
        )
        metadata = PodMetadata(NODE, config, **settings)
        try:
            await metadata.start()
            await scenario(server, metadata)
        finally:
            await metadata.stop()
            await server.stop()

    asyncio.run(main())


# --- workloads from owner references ---------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "labels", "workload", "ask"),
    [
        (
            ("ReplicaSet", "checkout-7d9f8b6c5d"),
            {"pod-template-hash": "7d9f8b6c5d"},
            "deployment/checkout",
            None,
        ),
        (("ReplicaSet", "legacy-rs"), {}, "replicaset/legacy-rs", ("ReplicaSet", "legacy-rs")),
        (("StatefulSet", "db"), {}, "statefulset/db", None),
        (("DaemonSet", "node-exporter"), {}, "daemonset/node-exporter", None),
        (("Job", "report-29634720"), {}, "cronjob/report", None),
        (("Job", "migrate"), {}, "job/migrate", ("Job", "migrate")),
        (("Node", NODE), {}, None, None),
        (None, {}, None, None),
    ],
)
def test_workload_of(
    owner: tuple[str, str] | None,
    labels: dict[str, str],
    workload: str | None,
    ask: tuple[str, str] | None,
) -> None:
    pod = make_pod("p", uid(), labels=labels, owner=owner)
    assert workload_of(pod) == (workload, ask)


def test_in_cluster_config(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("abc\n")
    (tmp_path / "ca.crt").write_text("not used here")
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    config = KubeApiConfig.in_cluster(env, tmp_path)
    assert config.url == "https://[fd00::1]:443"
    assert config.token_file == tmp_path / "token" and config.ca_file == tmp_path / "ca.crt"
    with pytest.raises(KubernetesError, match="--kube-api"):
        KubeApiConfig.in_cluster({}, tmp_path)
    with pytest.raises(KubernetesError, match="automountServiceAccountToken"):
        KubeApiConfig.in_cluster(env, tmp_path / "missing")


# --- list and watch ----------------------------------------------------------------------


def test_list_maps_this_nodes_pods() -> None:
    api = FakeKubeApi()
    ids = {name: (uid(), cid()) for name in ("checkout", "db", "exporter", "report", "bare")}
    owners = {
        "checkout": (("ReplicaSet", "checkout-5c8d7f9b4"), {"pod-template-hash": "5c8d7f9b4"}),
        "db": (("StatefulSet", "db"), {}),
        "exporter": (("DaemonSet", "exporter"), {}),
        "report": (("Job", "report-29634720"), {}),
        "bare": (None, {}),
    }
    for name, (pod_uid, container_id) in ids.items():
        owner, labels = owners[name]
        api.add_pod(
            make_pod(
                f"{name}-0",
                pod_uid,
                labels={"app": name, **labels},
                owner=owner,
                containers=[("main", container_id), ("sidecar", cid())],
            )
        )
    elsewhere = uid()
    api.add_pod(make_pod("remote", elsewhere, node="node-b", containers=[("main", cid())]))

    async def scenario(server: FakeKubeApi, metadata: PodMetadata) -> None:
        assert await metadata.wait_synced(5)
        listed = server.requests_for("list")
        # Paged: 5 pods, 2 per page, one snapshot.
        assert [r.params.get("continue", "") for r in listed] == ["", "2", "4"]
        assert all(r.params["fieldSelector"] == f"spec.nodeName={NODE}" for r in listed)
        expected = {
            "checkout": "deployment/checkout",
            "db": "statefulset/db",
            "exporter": "daemonset/exporter",
            "report": "cronjob/report",
            "bare": None,
        }
        for name, (pod_uid, container_id) in ids.items():
            found = metadata.lookup(pod_uid, container_id)
            assert found is not None
            assert found.event_fields() == {
                "k8s_namespace": "shop",
                "k8s_pod": f"{name}-0",
                "k8s_container": "main",
                "k8s_workload": expected[name],
            }
            assert found.labels["app"] == name
            assert metadata.lookup(None, container_id) == found  # by container id alone
        assert metadata.lookup(elsewhere, None) is None
        assert len(metadata.pods()) == 5
        # The watch starts from the list's version.
        await eventually(lambda: server.watch_count() == 1)
        watch = server.requests_for("watch")[0]
        assert watch.params["resourceVersion"] == str(server.version)
        assert watch.params["allowWatchBookmarks"] == "true"
        assert watch.params["fieldSelector"] == f"spec.nodeName={NODE}"

    run(scenario, api, page_size=2)


def test_watch_events_and_waiting_for_a_container() -> None:
    pod_uid, container_id = uid(), cid()
    labels = {"app": "orders", "pod-template-hash": "abc12"}
    owner = ("ReplicaSet", "orders-abc12")

    async def scenario(server: FakeKubeApi, metadata: PodMetadata) -> None:
        seen: list[tuple[str, str]] = []

        def listener(event: str, pod: PodInfo) -> None:
            seen.append((event, pod.name))

        metadata.subscribe(listener)
        assert await metadata.wait_synced(5)
        await eventually(lambda: server.watch_count() == 1)
        # The process execs before the kubelet reports its container.
        waiter = asyncio.create_task(metadata.wait_for(pod_uid, container_id, 5.0))
        server.add_pod(make_pod("orders-1", pod_uid, labels=labels, owner=owner))
        await eventually(lambda: metadata.pod(pod_uid) is not None)
        partial = metadata.lookup(pod_uid, container_id)
        assert partial is not None and partial.k8s_container is None
        assert partial.k8s_workload == "deployment/orders"
        assert not waiter.done()
        running = make_pod(
            "orders-1", pod_uid, labels=labels, owner=owner, containers=[("api", container_id)]
        )
        server.modify_pod(running)
        found = await asyncio.wait_for(waiter, 5)
        assert found is not None and found.k8s_container == "api"
        assert metadata.pending_waiters == 0
        # A bookmark moves the version on: the next watch starts from it, with no list.
        version = server.bookmark()
        await eventually(lambda: metadata.stats.events >= 3)
        server.end_watches()
        await eventually(lambda: len(server.requests_for("watch")) == 2)
        assert server.requests_for("watch")[1].params["resourceVersion"] == version
        assert len(server.requests_for("list")) == 1
        server.delete_pod(pod_uid)
        await eventually(lambda: metadata.lookup(pod_uid, container_id) is None)
        assert metadata.lookup(None, container_id) is None
        assert seen == [("ADDED", "orders-1"), ("MODIFIED", "orders-1"), ("DELETED", "orders-1")]
        # A wait that times out leaves nothing behind.
        assert await metadata.wait_for(uid(), None, 0.05) is None
        assert metadata.pending_waiters == 0

    run(scenario)


def test_gone_relists_and_reconciles() -> None:
    api = FakeKubeApi()
    stays, leaves, arrives = uid(), uid(), uid()
    api.add_pod(make_pod("stays", stays, containers=[("c", cid())]))
    api.add_pod(make_pod("leaves", leaves, containers=[("c", cid())]))

    async def scenario(server: FakeKubeApi, metadata: PodMetadata) -> None:
        seen: list[tuple[str, str]] = []
        metadata.subscribe(lambda event, pod: seen.append((event, pod.name)))
        assert await metadata.wait_synced(5)
        await eventually(lambda: server.watch_count() == 1)
        # While the watch is away its version is compacted, and the store changes unseen.
        server.change_unseen(delete=leaves)
        server.change_unseen(add=make_pod("arrives", arrives, containers=[("c", cid())]))
        server.expire_all()
        server.end_watches()
        await eventually(lambda: metadata.stats.relists_after_gone == 1)
        await eventually(lambda: metadata.pod(arrives) is not None)
        assert metadata.pod(leaves) is None and metadata.pod(stays) is not None
        assert ("DELETED", "leaves") in seen and ("ADDED", "arrives") in seen
        assert len(server.requests_for("list")) == 2
        await eventually(lambda: server.watch_count() == 1)
        assert server.requests_for("watch")[-1].params["resourceVersion"] == str(server.version)

    run(scenario, api)


def test_dropped_watch_resumes_from_the_last_version() -> None:
    first, second = uid(), uid()

    async def scenario(server: FakeKubeApi, metadata: PodMetadata) -> None:
        assert await metadata.wait_synced(5)
        await eventually(lambda: server.watch_count() == 1)
        server.add_pod(make_pod("first", first))
        await eventually(lambda: metadata.pod(first) is not None)
        version = str(server.version)
        server.drop_watches()  # half an event, then the connection is cut
        server.add_pod(make_pod("second", second))  # while no watch is open
        await eventually(lambda: metadata.pod(second) is not None)
        assert server.requests_for("watch")[-1].params["resourceVersion"] == version
        assert len(server.requests_for("list")) == 1
        assert metadata.stats.errors >= 1 and metadata.stats.relists_after_gone == 0

    run(scenario)


def test_unreachable_api_keeps_state_and_recovers() -> None:
    known, later = uid(), uid()
    api = FakeKubeApi()
    api.add_pod(make_pod("known", known, containers=[("c", cid())]))
    api.fail_next = [500, 503]  # the first two requests fail: start-up retries too

    async def scenario(server: FakeKubeApi, metadata: PodMetadata) -> None:
        assert await metadata.wait_synced(5)
        assert metadata.stats.errors == 2 and "HTTP 503" in metadata.stats.last_error
        await eventually(lambda: server.watch_count() == 1)
        await server.stop()  # the API server goes away: connection refused from now on
        await eventually(lambda: metadata.stats.errors >= 5)
        assert metadata.pod(known) is not None  # last known state kept
        server.add_pod(make_pod("later", later))
        await server.start()  # same port
        await eventually(lambda: metadata.pod(later) is not None)
        assert metadata.pod(known) is not None

    run(scenario, api)


def test_service_account_token_and_owner_lookups(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    api = FakeKubeApi(token="first-token")
    legacy, nightly, hidden = uid(), uid(), uid()
    api.add_pod(make_pod("legacy-x", legacy, owner=("ReplicaSet", "legacy-rs")))
    api.add_pod(make_pod("nightly-x", nightly, owner=("Job", "nightly-manual")))
    api.add_pod(make_pod("hidden-x", hidden, owner=("ReplicaSet", "hidden-rs")))
    api.owners[("replicasets", "shop", "legacy-rs")] = {
        "kind": "ReplicaSet",
        "apiVersion": "apps/v1",
        "metadata": {
            "name": "legacy-rs",
            "namespace": "shop",
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": "legacy",
                    "uid": "d",
                    "controller": True,
                }
            ],
        },
    }
    api.owners[("jobs", "shop", "nightly-manual")] = {
        "kind": "Job",
        "apiVersion": "batch/v1",
        "metadata": {
            "name": "nightly-manual",
            "namespace": "shop",
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "CronJob",
                    "name": "nightly",
                    "uid": "c",
                    "controller": True,
                }
            ],
        },
    }
    api.forbidden.add(("replicasets", "shop", "hidden-rs"))
    ids = (legacy, nightly, hidden)

    async def scenario(server: FakeKubeApi, metadata: PodMetadata) -> None:
        assert await metadata.wait_synced(5)
        workloads = {u: getattr(metadata.lookup(u, None), "k8s_workload", "?") for u in ids}
        assert workloads == {
            legacy: "deployment/legacy",
            nightly: "cronjob/nightly",
            hidden: "replicaset/hidden-rs",
        }
        assert all(r.headers["authorization"] == "Bearer first-token" for r in server.requests)
        # The kubelet rotates the projected token: the next request carries the new one.
        token.write_text("second-token\n")
        server.token = "second-token"
        server.end_watches()
        fresh = uid()
        server.add_pod(make_pod("fresh", fresh))
        await eventually(lambda: metadata.pod(fresh) is not None)
        assert server.requests[-1].headers["authorization"] == "Bearer second-token"

    run(scenario, api, token_file=token, resolve_owners=True)


def _self_signed(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server certificate for 127.0.0.1, signed by itself (the cluster's CA here)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=kubernetes",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


def test_https_with_the_service_account_ca(tmp_path: Path) -> None:
    """In a cluster the API server is HTTPS, verified with the service account's ca.crt."""
    context, cert = _self_signed(tmp_path)
    api = FakeKubeApi(tls=context)
    pod_uid = uid()
    api.add_pod(make_pod("tls", pod_uid))

    async def scenario(server: FakeKubeApi, metadata: PodMetadata) -> None:
        assert server.url.startswith("https://")
        assert await metadata.wait_synced(5)
        assert metadata.pod(pod_uid) is not None

    run(scenario, api, ca_file=cert)


def test_https_with_an_unknown_ca_is_refused(tmp_path: Path) -> None:
    context, cert = _self_signed(tmp_path)

    async def scenario(server: FakeKubeApi, metadata: PodMetadata) -> None:
        await eventually(lambda: metadata.stats.errors >= 2)
        assert not metadata.synced
        assert "certificate" in metadata.stats.last_error.lower()

    run(scenario, FakeKubeApi(tls=context))
