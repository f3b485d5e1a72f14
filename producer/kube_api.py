"""A small asyncio client of the Kubernetes API: GET, and GET of a watch as a stream.

The agent needs three requests (list pods, watch pods, read one owner), so a client of its
own beats a generated client of the whole API (kubernetes_asyncio: a dozen packages and
thousands of model modules). Authentication is the pod's service account: a bearer token
re-read on every request (projected tokens rotate) and the cluster's CA. The only module
that imports aiohttp.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ebpf_apm.producer.errors import AgentError

__all__ = ["ApiClient", "Gone", "KubeApiConfig", "KubeApiError", "KubernetesError"]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_EVENT_BYTES = 16 << 20  # one watch event (a pod with large annotations fits easily)
# What a request can fail with: the retriable ones are worth another try later.
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ValueError)


class KubernetesError(AgentError):
    """Kubernetes metadata cannot be had: not in a cluster, or the API refuses us."""


class KubeApiError(KubernetesError):
    """The API server answered with an error status (`status` 0: no answer at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retriable(self) -> bool:
        return self.status not in (400, 401, 403, 404, 422)


class Gone(KubeApiError):
    """410: the resourceVersion (or continue token) expired; list again."""


@dataclass(frozen=True)
class KubeApiConfig:
    url: str
    token_file: Path | None = None
    ca_file: Path | None = None
    insecure: bool = False  # tests and local clusters only

    @classmethod
    def in_cluster(
        cls, env: Mapping[str, str] | None = None, sa_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> KubeApiConfig:
        """The pod's own service account, as every in-cluster client finds it."""
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise KubernetesError(
                "not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST/PORT unset); "
                "pass --kube-api URL, or run without Kubernetes metadata"
            )
        token = sa_dir / "token"
        if not token.is_file():
            raise KubernetesError(
                f"{token} is missing: the agent's pod needs its service account token "
                "(automountServiceAccountToken: true)"
            )
        host = f"[{host}]" if ":" in host else host
        ca = sa_dir / "ca.crt"
        return cls(f"https://{host}:{port}", token, ca if ca.is_file() else None)


class ApiClient:
    """GET requests to the API server with the service account's token (re-read each time:
    projected tokens rotate)."""

    def __init__(self, config: KubeApiConfig, request_timeout_s: float) -> None:
        self.config = config
        self.request_timeout_s = request_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.config.url.startswith("https"):
            return False
        context = ssl.create_default_context(
            cafile=str(self.config.ca_file) if self.config.ca_file else None
        )
        if self.config.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=4),
                headers={"Accept": "application/json", "User-Agent": "ebpf-apm-agent"},
            )
        return self._session

    def _headers(self) -> dict[str, str]:
        if self.config.token_file is None:
            return {}
        try:
            token = self.config.token_file.read_text().strip()
        except OSError as exc:
            raise KubeApiError(0, f"cannot read {self.config.token_file}: {exc}") from exc
        return {"Authorization": f"Bearer {token}"}

    def _url(self, path: str) -> str:
        return self.config.url.rstrip("/") + path

    async def get(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        async with self._session_now().get(
            self._url(path), params=params, headers=self._headers(), timeout=timeout
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise _status_error(resp.status, body, path)
        return dict(json.loads(body))

    async def stream(
        self, path: str, params: Mapping[str, str], idle_timeout_s: float
    ) -> AsyncIterator[dict[str, Any]]:
        """The JSON objects of a watch, one per line, until the server ends the response."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.request_timeout_s, sock_read=idle_timeout_s
        )
        async with self._session_now().get(
            self._url(path), params=params, headers=self._headers(), timeout=timeout
        ) as resp:
            if resp.status != 200:
                raise _status_error(resp.status, await resp.read(), path)
            pending = bytearray()
            async for chunk in resp.content.iter_any():
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    line = bytes(pending[:end])
                    del pending[: end + 1]
                    if line.strip():
                        yield dict(json.loads(line))
                if len(pending) > MAX_EVENT_BYTES:
                    raise KubeApiError(0, f"watch event over {MAX_EVENT_BYTES} bytes")
            if pending.strip():
                yield dict(json.loads(pending))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _status_error(status: int, body: bytes, path: str) -> KubeApiError:
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    text = f"GET {path}: HTTP {status}: {message}"
    if status in (401, 403):
        text += (
            "; the agent's service account needs get/list/watch on pods "
            "(apply deploy/base/rbac.yaml)"
        )
    return (Gone if status == 410 else KubeApiError)(status, text)
