"""A Kubernetes API server for tests, on 127.0.0.1: pods' list and watch, ReplicaSet and Job
reads, shaped like the real server's responses.

- `GET /api/v1/pods?fieldSelector=spec.nodeName=N[&limit=L&continue=C]`: a PodList (items
  without kind/apiVersion, as the real server sends them), paged.
- `...&watch=true&resourceVersion=RV[&allowWatchBookmarks=true][&timeoutSeconds=T]`: a
  chunked stream of `{"type": ..., "object": ...}` lines: first every change after RV, then
  changes as they happen. An RV older than `expired_before` gets `ERROR` with a 410 Status.
- `GET /apis/apps/v1/namespaces/NS/replicasets/NAME`, `/apis/batch/v1/.../jobs/NAME`.

Test controls: add/modify/delete pods, send bookmarks, end or drop every open watch, fail
the next N requests with a status, expire versions, require a bearer token, stop and
restart on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Json = dict[str, Any]


def make_pod(
    name: str,
    uid: str,
    node: str = "node-a",
    namespace: str = "shop",
    labels: dict[str, str] | None = None,
    owner: tuple[str, str] | None = None,
    containers: list[tuple[str, str | None]] | None = None,
    runtime: str = "containerd",
) -> Json:
    """A Pod as the API server returns it (fields the agent does not read included)."""
    containers = containers if containers is not None else [("server", None)]
    meta: Json = {
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "resourceVersion": "0",
        "creationTimestamp": "2026-11-26T10:00:00Z",
        "labels": labels or {},
        "annotations": {"kubernetes.io/config.seen": "2026-11-26T10:00:00.000000000Z"},
    }
    if owner is not None:
        api_version = {
            "ReplicaSet": "apps/v1",
            "StatefulSet": "apps/v1",
            "DaemonSet": "apps/v1",
            "Job": "batch/v1",
            "Node": "v1",
        }.get(owner[0], "v1")
        meta["ownerReferences"] = [
            {
                "apiVersion": api_version,
                "kind": owner[0],
                "name": owner[1],
                "uid": f"owner-{owner[1]}",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    statuses = [
        {
            "name": cname,
            "state": {"running": {"startedAt": "2026-11-26T10:00:01Z"}},
            "ready": True,
            "restartCount": 0,
            "image": f"registry.local/{cname}:1",
            "imageID": f"registry.local/{cname}@sha256:{'0' * 64}",
            "containerID": f"{runtime}://{cid}",
            "started": True,
        }
        for cname, cid in containers
        if cid is not None
    ]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "containers": [{"name": c, "image": f"registry.local/{c}:1"} for c, _ in containers],
            "restartPolicy": "Always",
            "serviceAccountName": "default",
        },
        "status": {
            "phase": "Running" if statuses else "Pending",
            "hostIP": "10.0.0.1",
            "podIP": "10.244.0.7",
            "startTime": "2026-11-26T10:00:00Z",
            "containerStatuses": statuses,
        },
    }


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]


@dataclass
class _Watch:
    node: str | None
    queue: asyncio.Queue[Json | str] = field(default_factory=asyncio.Queue)


class FakeKubeApi:
    def __init__(self, token: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.token = token
        self.tls = tls
        self.pods: dict[str, Json] = {}
        self.owners: dict[tuple[str, str, str], Json] = {}  # (plural, ns, name) -> object
        self.forbidden: set[tuple[str, str, str]] = set()
        self.history: list[tuple[int, str, Json]] = []
        self.version = 100
        self.expired_before = 0
        self.fail_next: list[int] = []  # statuses for the next requests, in order
        self.requests: list[Request] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._watches: list[_Watch] = []
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # --- control --------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every connection, like an API server that went away."""
        if self._server is not None:
            self._server.close()
        self.drop_watches()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _bump(self, kind: str, pod: Json) -> None:
        self.version += 1
        pod["metadata"]["resourceVersion"] = str(self.version)
        snapshot = copy.deepcopy(pod)
        self.history.append((self.version, kind, snapshot))
        for watch in self._watches:
            if watch.node in (None, snapshot["spec"].get("nodeName")):
                watch.queue.put_nowait({"type": kind, "object": snapshot})

    def add_pod(self, pod: Json) -> None:
        self.pods[pod["metadata"]["uid"]] = pod
        self._bump("ADDED", pod)

    def modify_pod(self, pod: Json) -> None:
        self.pods[pod["metadata"]["uid"]] = pod
        self._bump("MODIFIED", pod)

    def delete_pod(self, uid: str) -> None:
        self._bump("DELETED", self.pods.pop(uid))

    def change_unseen(self, add: Json | None = None, delete: str | None = None) -> None:
        """Change the store without telling open watches (what a client misses while its
        version expires)."""
        self.version += 1
        if add is not None:
            add["metadata"]["resourceVersion"] = str(self.version)
            self.pods[add["metadata"]["uid"]] = add
        if delete is not None:
            self.pods.pop(delete)

    def bookmark(self) -> str:
        self.version += 1
        event = {
            "type": "BOOKMARK",
            "object": {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {
                    "resourceVersion": str(self.version),
                    "annotations": {"k8s.io/initial-events-end": "true"},
                },
            },
        }
        for watch in self._watches:
            watch.queue.put_nowait(event)
        return str(self.version)

    def expire_all(self) -> None:
        """Every version before the current one is compacted: a watch from any of them gets
        410, a fresh list's version still works."""
        self.expired_before = self.version

    def end_watches(self) -> None:
        """End open watches the way timeoutSeconds does: a clean end of the response."""
        for watch in self._watches:
            watch.queue.put_nowait("end")

    def drop_watches(self) -> None:
        """Cut open watches mid-stream: no terminating chunk, half an event sent."""
        for watch in self._watches:
            watch.queue.put_nowait("drop")

    def watch_count(self) -> int:
        return len(self._watches)

    def requests_for(self, kind: str) -> list[Request]:
        if kind == "watch":
            return [r for r in self.requests if r.params.get("watch") == "true"]
        if kind == "list":
            return [
                r
                for r in self.requests
                if r.path == "/api/v1/pods" and r.params.get("watch") != "true"
            ]
        return [r for r in self.requests if kind in r.path]

    # --- HTTP -----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                keep = await self._answer(request, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        line = await reader.readline()
        if not line:
            return None
        method, target, _ = line.decode().split(" ", 2)
        headers = {}
        while True:
            header = await reader.readline()
            if header in (b"\r\n", b"\n", b""):
                break
            name, _, value = header.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        url = urlsplit(target)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        return Request(method, unquote(url.path), params, headers)

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: Json) -> bool:
        data = json.dumps(body).encode()
        reason = {200: "OK", 403: "Forbidden", 404: "Not Found", 410: "Gone"}.get(status, "Error")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        return True

    @staticmethod
    def status(code: int, reason: str, message: str) -> Json:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }

    async def _answer(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        if self.token is not None and request.headers.get("authorization") != (
            f"Bearer {self.token}"
        ):
            return await self._send(writer, 401, self.status(401, "Unauthorized", "no"))
        if self.fail_next:
            code = self.fail_next.pop(0)
            return await self._send(writer, code, self.status(code, "InternalError", "boom"))
        parts = request.path.strip("/").split("/")
        if request.path == "/api/v1/pods":
            node = _node_of(request.params.get("fieldSelector", ""))
            if request.params.get("watch") == "true":
                await self._watch(request, node, writer)
                return False
            return await self._list(request, node, writer)
        if len(parts) == 7 and parts[0] == "apis" and parts[3] == "namespaces":
            key = (parts[5], parts[4], parts[6])  # (plural, namespace, name)
            if key in self.forbidden:
                return await self._send(writer, 403, self.status(403, "Forbidden", "denied"))
            if key in self.owners:
                return await self._send(writer, 200, self.owners[key])
        return await self._send(writer, 404, self.status(404, "NotFound", request.path))

    async def _list(self, request: Request, node: str | None, writer: asyncio.StreamWriter) -> bool:
        items = [
            _without_type(p)
            for p in sorted(self.pods.values(), key=lambda p: p["metadata"]["name"])
            if node is None or p["spec"].get("nodeName") == node
        ]
        limit = int(request.params.get("limit") or 0) or len(items) or 1
        start = int(request.params.get("continue") or 0)
        page = items[start : start + limit]
        meta: Json = {"resourceVersion": str(self.version)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": page}
        return await self._send(writer, 200, body)

    async def _watch(
        self, request: Request, node: str | None, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        since = int(request.params.get("resourceVersion") or 0)

        def chunk(event: Json) -> bytes:
            data = json.dumps(event).encode() + b"\n"
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        if since < self.expired_before:
            gone = self.status(410, "Expired", f"too old resource version: {since}")
            writer.write(chunk({"type": "ERROR", "object": gone}) + b"0\r\n\r\n")
            await writer.drain()
            return
        watch = _Watch(node)
        for version, kind, obj in self.history:
            if version > since and node in (None, obj["spec"].get("nodeName")):
                watch.queue.put_nowait({"type": kind, "object": obj})
        self._watches.append(watch)
        timeout = float(request.params.get("timeoutSeconds") or 3600)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(watch.queue.get(), timeout)
                except TimeoutError:
                    item = "end"
                if item == "end":
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    return
                if item == "drop":
                    half = chunk({"type": "MODIFIED", "object": {"metadata": {}}})
                    writer.write(half[: len(half) // 2])
                    await writer.drain()
                    writer.transport.abort()
                    return
                assert isinstance(item, dict)
                writer.write(chunk(item))
                await writer.drain()
        finally:
            self._watches.remove(watch)


def _node_of(selector: str) -> str | None:
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if key == "spec.nodeName":
            return value
    return None


def _without_type(pod: Json) -> Json:
    item = copy.deepcopy(pod)
    item.pop("kind", None)
    item.pop("apiVersion", None)
    return item
