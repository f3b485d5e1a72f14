"""`ebpf-apm agent --config targets.yaml`: targets found by rules as processes come and go.

    sched exec/exit tracepoints + /proc scan -> TargetTracker (rules, pod metadata)
        -> plan once per binary (ResolveOnceCache) -> AgentPipeline.attach / detach

Kubernetes names come from the pod watch when the agent runs in a cluster (or is given
--kube-api); outside Kubernetes the rules select by executable only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from producer.errors import AgentError
from producer.k8s_metadata import PodMetadata
from producer.kube_api import KubeApiConfig
from producer.pipeline import AgentPipeline
from producer.pod_identity import read_cgroup_identity
from producer.process_discovery import ProcessDiscovery, ResolveOnceCache
from producer.target_rules import TargetRules, TargetRulesFile
from producer.target_tracker import TargetTracker, TrackedProcess
from producer.targets import BinaryPlan, FunctionNames, bind_process, plan_binary

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


async def serve_agent(
    pipeline: AgentPipeline,
    rules_file: TargetRulesFile | None,
    rules: TargetRules | None,
    names: FunctionNames,
    http_allowed: bool,
    kubernetes: KubernetesSettings | None,
) -> int:
    """Run the pipeline; with rules, they attach and detach processes as they come and go;
    with Kubernetes, events carry pod names."""
    metadata = None
    if kubernetes is not None:
        metadata = pod_metadata(kubernetes)
        await metadata.start()
        if not await metadata.wait_synced(10):
            log.warning("the Kubernetes API is not reachable yet; pods are named once it is")
        await label_static_targets(pipeline, metadata)
    try:
        if rules_file is None or rules is None:
            return await pipeline.run()
        return await _serve_rules(pipeline, rules_file, rules, names, http_allowed, metadata)
    finally:
        if metadata is not None:
            await metadata.stop()


async def _serve_rules(
    pipeline: AgentPipeline,
    rules_file: TargetRulesFile,
    rules: TargetRules,
    names: FunctionNames,
    http_allowed: bool,
    metadata: PodMetadata | None,
) -> int:
    planner = RulePlanner(names, http_allowed)

    def on_attach(process: TrackedProcess) -> None:
        request = process.request
        try:
            plan = planner.plan(process.pid, tuple(request.functions), request.http)
            pipeline.attach(bind_process(process.pid, plan), k8s=process.event_fields())
        except AgentError as exc:  # one unprobeable process must not stop the others
            log.warning("pid %d (%s) matched %s but cannot be traced: %s",
                        process.pid, process.exe, ", ".join(request.rules), exc)  # fmt: skip
            return
        log.info("pid %d (%s) selected by %s: %d function(s) probed", process.pid,
                 process.exe, ", ".join(request.rules), len(plan.functions))  # fmt: skip

    tracker = TargetTracker(
        rules,
        on_attach,
        pipeline.detach,
        metadata,
        on_update=lambda p: pipeline.update_process(p.pid, p.event_fields()),
    )
    discovery = ProcessDiscovery(tracker.on_process_event)

    async def reload_rules() -> None:
        while True:
            await asyncio.sleep(RULES_RELOAD_S)
            try:
                new = rules_file.reload_if_changed()
            except AgentError as exc:
                log.error("%s; keeping the previous targets", exc)
                continue
            if new is not None:
                tracker.set_rules(new)
                log.info("targets reloaded from %s", rules_file.path)

    reloading = asyncio.create_task(reload_rules())
    await discovery.start()
    try:
        return await pipeline.run()
    finally:
        reloading.cancel()
        await discovery.stop()
        await tracker.stop()
