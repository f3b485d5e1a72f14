"""Names of the pods on this node, kept current by a watch on the Kubernetes API server.

    list pods (fieldSelector spec.nodeName=NODE, paged) -> resourceVersion
      -> watch from it: ADDED / MODIFIED / DELETED update the index, BOOKMARK moves the
         version on, ERROR 410 (Gone) means the version expired: list again
      -> the server ends the watch (timeoutSeconds) or the connection drops: watch again
         from the last version; API unreachable: keep what is known, retry with backoff

The index maps pod UID (from the process's cgroup, see producer.pod_identity) and container
id to namespace, pod, container and owning workload. Workloads come from the pod's
controller ownerReference: a ReplicaSet named `<deployment>-<pod-template-hash>` is a
Deployment's, and a Job named `<cronjob>-<8 digits>` a CronJob's (the names their
controllers give them). With `resolve_owners` the ReplicaSet or Job is read from the API
instead when the name does not say (that needs `get` on replicasets and jobs in RBAC).

The API client itself is producer.kube_api.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ebpf_apm.producer.kube_api import (
    TRANSPORT_ERRORS,
    ApiClient,
    Gone,
    KubeApiConfig,
    KubeApiError,
    KubernetesError,
)

__all__ = [
    "K8sIdentity",
    "KubeApiConfig",
    "KubeApiError",
    "KubernetesError",
    "MetadataStats",
    "PodInfo",
    "PodMetadata",
    "workload_of",
]

log = logging.getLogger(__name__)

_CRONJOB_JOB = re.compile(r"^(?P<cronjob>.+)-(?P<minutes>\d{8})$")


@dataclass(frozen=True)
class K8sIdentity:
    k8s_namespace: str
    k8s_pod: str
    k8s_container: str | None
    k8s_workload: str | None
    labels: Mapping[str, str]

    def event_fields(self) -> dict[str, str | None]:
        """The four fields every event of the process carries (ProcessInfo.k8s)."""
        return {
            "k8s_namespace": self.k8s_namespace,
            "k8s_pod": self.k8s_pod,
            "k8s_container": self.k8s_container,
            "k8s_workload": self.k8s_workload,
        }


@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str]
    workload: str | None  # "deployment/checkout", "statefulset/db", ...; None: a bare pod
    containers: Mapping[str, str]  # container id -> container name, from the pod's status
    phase: str = ""

    def identity(self, container_id: str | None) -> K8sIdentity:
        return K8sIdentity(
            self.namespace,
            self.name,
            self.containers.get(container_id) if container_id else None,
            self.workload,
            self.labels,
        )


@dataclass
class MetadataStats:
    lists: int = 0
    watches: int = 0
    events: int = 0
    relists_after_gone: int = 0
    errors: int = 0
    last_error: str = ""
    synced_at: float = 0.0  # time.time() of the last successful list or watch event


def _owner(meta: Mapping[str, Any]) -> tuple[str, str] | None:
    owners = meta.get("ownerReferences") or []
    chosen = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    if not chosen or not chosen.get("kind") or not chosen.get("name"):
        return None
    return str(chosen["kind"]), str(chosen["name"])


def workload_of(pod: Mapping[str, Any]) -> tuple[str | None, tuple[str, str] | None]:
    """(workload, owner the API must be asked about) from the pod alone.

    The second item is set when the name conventions do not settle it: a ReplicaSet without
    its Deployment's pod-template-hash suffix, or a Job that a CronJob may own."""
    meta = pod.get("metadata") or {}
    owner = _owner(meta)
    if owner is None:
        return None, None
    kind, name = owner
    if kind == "ReplicaSet":
        template_hash = (meta.get("labels") or {}).get("pod-template-hash")
        if template_hash and name.endswith("-" + template_hash):
            return f"deployment/{name[: -len(template_hash) - 1]}", None
        return f"replicaset/{name}", owner
    if kind == "Job":
        match = _CRONJOB_JOB.match(name)
        if match:
            return f"cronjob/{match.group('cronjob')}", None
        return f"job/{name}", owner
    if kind == "Node":  # a static pod's mirror: no workload object
        return None, None
    return f"{kind.lower()}/{name}", None


def _container_ids(status: Mapping[str, Any]) -> dict[str, str]:
    found = {}
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            raw = cs.get("containerID") or ""
            if "://" in raw and cs.get("name"):
                found[raw.split("://", 1)[1]] = str(cs["name"])
    return found


Listener = Callable[[str, PodInfo], None]


class PodMetadata:
    """The pods of one node, by UID and container id; see the module docstring."""

    def __init__(
        self,
        node_name: str,
        api: KubeApiConfig,
        *,
        resolve_owners: bool = False,
        watch_timeout_s: int = 300,
        idle_timeout_s: float = 120.0,
        request_timeout_s: float = 30.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        page_size: int = 500,
    ) -> None:
        self.node_name = node_name
        self.resolve_owners = resolve_owners
        self.watch_timeout_s = watch_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.page_size = page_size
        self.stats = MetadataStats()
        self._client = ApiClient(api, request_timeout_s)
        self._pods: dict[str, PodInfo] = {}
        self._by_container: dict[str, str] = {}  # container id -> pod uid
        self._resource_version = ""
        self._listeners: list[Listener] = []
        self._waiters: dict[str, list[tuple[str | None, asyncio.Future[None]]]] = {}
        self._owners: OrderedDict[tuple[str, str, str], str | None] = OrderedDict()
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- the interface the agent uses -----------------------------------------------------

    async def start(self) -> None:
        """Begin listing and watching in the background; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="k8s-pod-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.close()
        for waiters in self._waiters.values():
            for _, future in waiters:
                future.cancel()
        self._waiters.clear()

    async def wait_synced(self, timeout_s: float) -> bool:
        """True once the first list has arrived (False after `timeout_s` without one)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), timeout_s)
        return self._synced.is_set()

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def lookup(self, pod_uid: str | None, container_id: str | None) -> K8sIdentity | None:
        """Identity of a container; `k8s_container` is None while the pod's status does not
        list the container yet. None when the pod is unknown."""
        uid = pod_uid or (self._by_container.get(container_id) if container_id else None)
        pod = self._pods.get(uid) if uid else None
        return pod.identity(container_id) if pod else None

    def pod(self, pod_uid: str) -> PodInfo | None:
        return self._pods.get(pod_uid)

    def pods(self) -> list[PodInfo]:
        return list(self._pods.values())

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event, pod)` on ADDED, MODIFIED and DELETED; returns an unsubscribe.
        A relist reports what changed the same way."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def wait_for(
        self, pod_uid: str, container_id: str | None, timeout_s: float
    ) -> K8sIdentity | None:
        """Wait until the pod (and, if given, the container) is known: a process can exec
        before the kubelet has reported its container. Returns what is known at the end."""
        found = self.lookup(pod_uid, container_id)
        if found is not None and (container_id is None or found.k8s_container is not None):
            return found
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (container_id, future)
        self._waiters.setdefault(pod_uid, []).append(entry)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(future), timeout_s)
        finally:
            waiters = self._waiters.get(pod_uid)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(entry)
                if not waiters:
                    del self._waiters[pod_uid]
        return self.lookup(pod_uid, container_id)

    @property
    def pending_waiters(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    # --- list and watch ---------------------------------------------------------------

    def _selector(self) -> str:
        return f"spec.nodeName={self.node_name}"

    async def _run(self) -> None:
        delay = self.backoff_initial_s
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                    delay = self.backoff_initial_s
                started = time.monotonic()
                if await self._watch() or time.monotonic() - started > 1.0:
                    delay = self.backoff_initial_s
                    continue
                # The stream ended at once without a single event: do not spin on it.
            except Gone:
                self.stats.relists_after_gone += 1
                log.info("pod watch: resourceVersion %s expired; listing again", self._rv_text)
                need_list = True
                continue
            except (KubeApiError, *TRANSPORT_ERRORS) as exc:
                self._note_error(exc, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.backoff_max_s)

    @property
    def _rv_text(self) -> str:
        return self._resource_version or "(none)"

    def _note_error(self, exc: BaseException, delay: float) -> None:
        self.stats.errors += 1
        text = str(exc) or type(exc).__name__
        level = logging.WARNING if text != self.stats.last_error else logging.DEBUG
        log.log(
            level,
            "Kubernetes API (%s): %s; keeping %d known pods, retrying in %.1f s",
            self._client.config.url,
            text,
            len(self._pods),
            delay,
        )
        self.stats.last_error = text

    async def _list(self) -> None:
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            params = {"fieldSelector": self._selector(), "limit": str(self.page_size)}
            if token:
                params["continue"] = token
            body = await self._client.get("/api/v1/pods", params)
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                version = str(meta.get("resourceVersion") or "")
                break
        self.stats.lists += 1
        fresh = {}
        for item in items:
            pod = await self._pod_info(item)
            if pod is not None:
                fresh[pod.uid] = pod
        for uid in [u for u in self._pods if u not in fresh]:
            self._remove(uid)
        for pod in fresh.values():
            self._store(pod)
        self._resource_version = version
        self.stats.synced_at = time.time()
        self._synced.set()
        log.info("pod metadata: %d pods on node %s", len(self._pods), self.node_name)

    async def _watch(self) -> bool:
        """Follow the watch until the server ends it; True if any event arrived."""
        params = {
            "fieldSelector": self._selector(),
            "watch": "true",
            "resourceVersion": self._resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout_s),
        }
        self.stats.watches += 1
        seen = False
        async for event in self._client.stream("/api/v1/pods", params, self.idle_timeout_s):
            seen = True
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                code = int(obj.get("code") or 0)
                message = f"watch error {code} {obj.get('reason', '')}: {obj.get('message', '')}"
                raise (Gone if code == 410 else KubeApiError)(code, message)
            self.stats.events += 1
            if kind in ("ADDED", "MODIFIED"):
                pod = await self._pod_info(obj)
                if pod is not None:
                    self._store(pod)
            elif kind == "DELETED":
                uid = (obj.get("metadata") or {}).get("uid")
                if uid:
                    self._remove(str(uid))
            elif kind != "BOOKMARK":
                log.debug("pod watch: ignoring event type %r", kind)
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if version:
                self._resource_version = str(version)
            self.stats.synced_at = time.time()
        return seen

    # --- the index --------------------------------------------------------------------

    async def _pod_info(self, obj: Mapping[str, Any]) -> PodInfo | None:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        if not meta.get("uid") or spec.get("nodeName") not in (None, self.node_name):
            return None
        namespace = str(meta.get("namespace") or "")
        workload, ask = workload_of(obj)
        if ask is not None and self.resolve_owners:
            workload = await self._resolve_owner(namespace, ask) or workload
        return PodInfo(
            uid=str(meta["uid"]),
            namespace=namespace,
            name=str(meta.get("name") or ""),
            labels=dict(meta.get("labels") or {}),
            workload=workload,
            containers=_container_ids(obj.get("status") or {}),
            phase=str((obj.get("status") or {}).get("phase") or ""),
        )

    async def _resolve_owner(self, namespace: str, owner: tuple[str, str]) -> str | None:
        kind, name = owner
        key = (namespace, kind, name)
        if key in self._owners:
            self._owners.move_to_end(key)
            return self._owners[key]
        group = "apps" if kind == "ReplicaSet" else "batch"
        plural = "replicasets" if kind == "ReplicaSet" else "jobs"
        path = f"/apis/{group}/v1/namespaces/{quote(namespace)}/{plural}/{quote(name)}"
        try:
            obj = await self._client.get(path, {})
        except (KubeApiError, *TRANSPORT_ERRORS) as exc:
            log.debug("owner of %s/%s: %s", kind, name, exc)
            if isinstance(exc, KubeApiError) and not exc.retriable:
                self._owners[key] = None  # forbidden or gone: the name is the best we have
            return None
        parent = _owner(obj.get("metadata") or {})
        result = f"{parent[0].lower()}/{parent[1]}" if parent else None
        self._owners[key] = result
        while len(self._owners) > 1024:
            self._owners.popitem(last=False)
        return result

    def _store(self, pod: PodInfo) -> None:
        old = self._pods.get(pod.uid)
        if old == pod:
            return
        if old is not None:
            for cid in old.containers:
                if self._by_container.get(cid) == pod.uid:
                    del self._by_container[cid]
        self._pods[pod.uid] = pod
        for cid in pod.containers:
            self._by_container[cid] = pod.uid
        self._notify("ADDED" if old is None else "MODIFIED", pod)
        for container_id, future in self._waiters.get(pod.uid, []):
            if not future.done() and (container_id is None or container_id in pod.containers):
                future.set_result(None)

    def _remove(self, uid: str) -> None:
        pod = self._pods.pop(uid, None)
        if pod is None:
            return
        for cid in pod.containers:
            if self._by_container.get(cid) == uid:
                del self._by_container[cid]
        self._notify("DELETED", pod)

    def _notify(self, event: str, pod: PodInfo) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, pod)
            except Exception:  # a listener's bug must not stop the watch
                log.exception("pod metadata listener failed on %s %s", event, pod.name)
