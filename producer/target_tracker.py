"""Which running processes the targets file selects, kept current as processes come and go.

    ProcessDiscovery events ("running", "exec", "exit")
      -> exe path (/proc/PID/exe) and pod identity (/proc/PID/cgroup)
      -> pod metadata (waits a few seconds for a pod or container the API has not shown yet)
      -> TargetRules.plan -> on_attach(TrackedProcess)        exit -> on_detach(pid)

Decisions only: the caller's `on_attach` resolves the binary and attaches probes (and may
raise an AgentError for a binary it cannot probe: logged, counted, not fatal), `on_detach`
removes them. A process that execs a new program is detached, then looked at afresh.
Nothing is kept for a process that is not selected, so short-lived processes leave nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from ebpf_apm.producer.errors import AgentError
from ebpf_apm.producer.k8s_metadata import K8sIdentity, PodMetadata
from ebpf_apm.producer.pod_identity import CgroupIdentity, read_cgroup_identity
from ebpf_apm.producer.process_discovery import ProcessEvent
from ebpf_apm.producer.target_rules import ProbeRequest, ProcessFacts, TargetRules

__all__ = ["TrackedProcess", "TargetTracker", "TrackerStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackedProcess:
    pid: int
    exe: str  # as the process sees it
    binary: tuple[int, int]  # (st_dev, st_ino) of its executable, to notice a re-exec
    request: ProbeRequest
    cgroup: CgroupIdentity | None
    k8s: K8sIdentity | None

    def event_fields(self) -> dict[str, str | None] | None:
        """The k8s fields of the process's events (ProcessInfo.k8s); None outside pods."""
        return self.k8s.event_fields() if self.k8s else None


@dataclass
class TrackerStats:
    considered: int = 0
    selected: int = 0
    attach_failed: int = 0
    detached: int = 0
    metadata_missing: int = 0  # in a pod the API did not show in time: matched without it


class TargetTracker:
    def __init__(
        self,
        rules: TargetRules,
        on_attach: Callable[[TrackedProcess], None],
        on_detach: Callable[[int], None],
        metadata: PodMetadata | None = None,
        on_update: Callable[[TrackedProcess], None] | None = None,
        pod_wait_s: float = 5.0,
        container_wait_s: float = 60.0,
        ignore_pids: frozenset[int] = frozenset(),
    ) -> None:
        self.rules = rules
        self.on_attach = on_attach
        self.on_detach = on_detach
        self.on_update = on_update
        self.metadata = metadata
        self.pod_wait_s = pod_wait_s
        self.container_wait_s = container_wait_s
        self.ignore_pids = ignore_pids | {os.getpid()}
        self.stats = TrackerStats()
        self.tracked: dict[int, TrackedProcess] = {}
        self._pending: dict[int, asyncio.Task[None]] = {}  # waiting for pod metadata

    def set_rules(self, rules: TargetRules) -> None:
        """New rules (the ConfigMap changed): they apply to processes that start from now."""
        self.rules = rules

    def on_process_event(self, event: ProcessEvent) -> None:
        """Feed from ProcessDiscovery; runs in the event loop."""
        pid = event.pid
        if pid in self.ignore_pids:
            return
        if event.kind == "exit":
            self._forget(pid)
            return
        try:
            exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
            st = os.stat(f"/proc/{pid}/exe")
            cgroup = read_cgroup_identity(pid)
        except (OSError, ProcessLookupError):
            self._forget(pid)  # gone already, or a kernel thread
            return
        binary = (st.st_dev, st.st_ino)
        known = self.tracked.get(pid)
        if known is not None and known.binary == binary:
            return  # the scan and the exec stream both reported it
        self._forget(pid)  # a new program in the same process, or a decision still pending
        self.stats.considered += 1
        if cgroup is None or cgroup.pod_uid is None or self.metadata is None:
            self._decide(pid, exe, binary, cgroup, None)
            return
        k8s = self.metadata.lookup(cgroup.pod_uid, cgroup.container_id)
        if k8s is None or (self._needs_container(cgroup, k8s) and self.rules.uses_container_names):
            self._later(pid, self._decide_later(pid, exe, binary, cgroup))
            return
        self._decide(pid, exe, binary, cgroup, k8s)

    @staticmethod
    def _needs_container(cgroup: CgroupIdentity, k8s: K8sIdentity | None) -> bool:
        return cgroup.container_id is not None and (k8s is None or k8s.k8s_container is None)

    def _later(self, pid: int, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending[pid] = task
        task.add_done_callback(
            lambda t: self._pending.pop(pid, None) if self._pending.get(pid) is t else None
        )

    async def _decide_later(
        self, pid: int, exe: str, binary: tuple[int, int], cgroup: CgroupIdentity
    ) -> None:
        """The pod (or, if a rule selects by container name, the container) is not known
        yet: the process can exec before the API server shows it."""
        assert self.metadata is not None and cgroup.pod_uid is not None
        wanted = cgroup.container_id if self.rules.uses_container_names else None
        k8s = await self.metadata.wait_for(cgroup.pod_uid, wanted, self.pod_wait_s)
        if k8s is None:
            self.stats.metadata_missing += 1
            log.info("pid %d (%s): pod %s unknown to the API server", pid, exe, cgroup.pod_uid)
        if os.path.exists(f"/proc/{pid}"):
            self._decide(pid, exe, binary, cgroup, k8s)

    async def _name_container_later(self, pid: int, cgroup: CgroupIdentity) -> None:
        """Attached while the pod's status did not list the container yet: name it when it
        does, so later events carry k8s_container."""
        assert self.metadata is not None and cgroup.pod_uid is not None
        k8s = await self.metadata.wait_for(
            cgroup.pod_uid, cgroup.container_id, self.container_wait_s
        )
        process = self.tracked.get(pid)
        if process is None or k8s is None or k8s == process.k8s:
            return
        process = replace(process, k8s=k8s)
        self.tracked[pid] = process
        if self.on_update is not None:
            self.on_update(process)

    def _decide(
        self,
        pid: int,
        exe: str,
        binary: tuple[int, int],
        cgroup: CgroupIdentity | None,
        k8s: K8sIdentity | None,
    ) -> None:
        facts = ProcessFacts.of(
            exe,
            k8s.k8s_namespace if k8s else None,
            k8s.k8s_container if k8s else None,
            k8s.labels if k8s else None,
        )
        request = self.rules.plan(facts)
        if request is None:
            return
        self.stats.selected += 1
        process = TrackedProcess(pid, exe, binary, request, cgroup, k8s)
        try:
            self.on_attach(process)
        except AgentError as exc:
            self.stats.attach_failed += 1
            log.warning("pid %d (%s), selected by %s: %s", pid, exe, ", ".join(request.rules), exc)
            return
        self.tracked[pid] = process
        if cgroup is not None and self.metadata is not None and self._needs_container(cgroup, k8s):
            self._later(pid, self._name_container_later(pid, cgroup))

    def _cancel_pending(self, pid: int) -> None:
        task = self._pending.pop(pid, None)
        if task is not None:
            task.cancel()

    def _forget(self, pid: int) -> None:
        self._cancel_pending(pid)
        if self.tracked.pop(pid, None) is not None:
            self.stats.detached += 1
            self.on_detach(pid)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def stop(self) -> None:
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pending.clear()
