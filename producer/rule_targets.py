"""`ebpf-apm agent --config targets.yaml`: targets found by rules as processes come and go.

    sched exec/exit tracepoints + /proc scan -> TargetTracker (rules, pod metadata)
        -> plan once per binary (ResolveOnceCache) -> AgentPipeline.attach / detach
    the rules file, re-read every RULES_RELOAD_S when it changed -> TargetTracker.set_rules

Kubernetes names come from the pod watch when the agent runs in a cluster (or is given
--kube-api); outside Kubernetes the rules select by executable only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ebpf_apm.producer.errors import AgentError
from ebpf_apm.producer.k8s_metadata import PodMetadata
from ebpf_apm.producer.kube_api import KubeApiConfig
from ebpf_apm.producer.pipeline import AgentPipeline
from ebpf_apm.producer.pod_identity import read_cgroup_identity
from ebpf_apm.producer.process_discovery import ProcessDiscovery, ResolveOnceCache
from ebpf_apm.producer.target_rules import TargetRules, TargetRulesFile
from ebpf_apm.producer.target_tracker import TargetTracker, TrackedProcess
from ebpf_apm.producer.targets import BinaryPlan, FunctionNames, bind_process, plan_binary

log = logging.getLogger(__name__)

RULES_RELOAD_S = 5.0


@dataclass(frozen=True)
class KubernetesSettings:
    node_name: str
    api_url: str | None  # None: in-cluster service account
    resolve_owners: bool = False


def pod_metadata(settings: KubernetesSettings) -> PodMetadata:
    api = KubeApiConfig(settings.api_url) if settings.api_url else KubeApiConfig.in_cluster()
    return PodMetadata(settings.node_name, api, resolve_owners=settings.resolve_owners)


async def start_pod_metadata(settings: KubernetesSettings) -> PodMetadata:
    """The pod watch, started; waits a little for the first listing."""
    metadata = pod_metadata(settings)
    await metadata.start()
    if not await metadata.wait_synced(10):
        log.warning("the Kubernetes API is not reachable yet; pods are named once it is")
    return metadata


class RulePlanner:
    """One plan per (functions, http) request and binary, shared by all its processes."""

    def __init__(self, names: FunctionNames, http_allowed: bool) -> None:
        self.names = names
        self.http_allowed = http_allowed
        self._caches: dict[tuple[tuple[str, ...], bool], ResolveOnceCache[BinaryPlan]] = {}

    def plan(self, pid: int, functions: tuple[str, ...], http: bool) -> BinaryPlan:
        key = (functions, http and self.http_allowed)
        cache = self._caches.get(key)
        if cache is None:
            resolver: Callable[[str], BinaryPlan] = lambda path: plan_binary(  # noqa: E731
                path, list(key[0]), self.names, key[1]
            )
            cache = self._caches[key] = ResolveOnceCache(resolver)
        return cache.get(pid)


async def label_static_targets(pipeline: AgentPipeline, metadata: PodMetadata) -> None:
    """--pid/--exe targets inside pods get their Kubernetes names too."""
    for pid in list(pipeline.targets):
        with contextlib.suppress(ProcessLookupError):
            cgroup = read_cgroup_identity(pid)
            if cgroup is not None and cgroup.in_kubernetes:
                identity = metadata.lookup(cgroup.pod_uid, cgroup.container_id)
                if identity is not None:
                    pipeline.update_process(pid, identity.event_fields())


class RuleTargets:
    """Attaches the processes the rules select as they start, detaches them as they exit,
    and follows changes of the rules file."""

    def __init__(
        self,
        pipeline: AgentPipeline,
        rules_file: TargetRulesFile,
        rules: TargetRules,
        names: FunctionNames,
        http_allowed: bool,
        metadata: PodMetadata | None,
    ) -> None:
        self._pipeline = pipeline
        self._rules_file = rules_file
        self._planner = RulePlanner(names, http_allowed)
        self._tracker = TargetTracker(
            rules,
            self._attach,
            pipeline.detach,
            metadata,
            on_update=lambda p: pipeline.update_process(p.pid, p.event_fields()),
        )
        self._discovery = ProcessDiscovery(self._tracker.on_process_event)
        self._reloading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._reloading = asyncio.create_task(self._reload_rules())
        await self._discovery.start()

    async def stop(self) -> None:
        if self._reloading is not None:
            self._reloading.cancel()
        await self._discovery.stop()
        await self._tracker.stop()

    def _attach(self, process: TrackedProcess) -> None:
        request = process.request
        try:
            plan = self._planner.plan(process.pid, tuple(request.functions), request.http)
            self._pipeline.attach(bind_process(process.pid, plan), k8s=process.event_fields())
        except AgentError as exc:  # one unprobeable process must not stop the others
            log.warning("pid %d (%s) matched %s but cannot be traced: %s",
                        process.pid, process.exe, ", ".join(request.rules), exc)  # fmt: skip
            return
        log.info("pid %d (%s) selected by %s: %d function(s) probed", process.pid,
                 process.exe, ", ".join(request.rules), len(plan.functions))  # fmt: skip

    async def _reload_rules(self) -> None:
        while True:
            await asyncio.sleep(RULES_RELOAD_S)
            try:
                new = self._rules_file.reload_if_changed()
            except AgentError as exc:
                log.error("%s; keeping the previous targets", exc)
                continue
            if new is not None:
                self._tracker.set_rules(new)
                log.info("targets reloaded from %s", self._rules_file.path)
