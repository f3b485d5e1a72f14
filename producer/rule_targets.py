"""`ebpf-apm agent --config targets.yaml`: targets found by rules as processes come and go.

    sched exec/exit tracepoints + /proc scan -> TargetTracker (rules, pod metadata)
        -> plan once per binary (ResolveOnceCache, in the "binary-parse" worker thread)
        -> AgentPipeline.attach_running / detach (the pipeline's probe worker, in order)
    the rules file, re-read every RULES_RELOAD_S when it changed -> TargetTracker.set_rules

Target binaries are input the agent does not control. They are parsed in one worker thread,
so the drain loop keeps turning while a large binary is read, within BinaryLimits (size,
parse time). The outcome is cached per binary, failure too: a binary that cannot be traced
is parsed once and reported in one warning however often it is exec'd; later processes of
it are only counted (`RuleTargets.repeated_failures`).

Kubernetes names come from the pod watch when the agent runs in a cluster (or is given
--kube-api); outside Kubernetes the rules select by executable only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ebpf_apm.producer.binary_guard import BinaryLimits
from ebpf_apm.producer.errors import AgentError
from ebpf_apm.producer.heap_trim import release_free_memory
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


@dataclass(frozen=True)
class Planned:
    """The plan for a process's binary, or why it cannot be traced; ``fresh`` is False when
    the outcome came from the cache (the binary was parsed for an earlier process)."""

    plan: BinaryPlan | None
    error: AgentError | None
    fresh: bool


class RulePlanner:
    """One plan per (functions, http) request and binary, shared by all its processes.

    Not thread-safe: call it from one thread (RuleTargets uses one worker thread)."""

    def __init__(
        self, names: FunctionNames, http_allowed: bool, limits: BinaryLimits | None = None
    ) -> None:
        self.names = names
        self.http_allowed = http_allowed
        self.limits = limits or BinaryLimits()
        self._caches: dict[tuple[tuple[str, ...], bool], ResolveOnceCache[BinaryPlan]] = {}

    @property
    def parses(self) -> int:
        """Binaries parsed so far (cache misses), successes and failures."""
        return sum(cache.misses for cache in self._caches.values())

    def plan(self, pid: int, functions: tuple[str, ...], http: bool) -> Planned:
        """Raises ProcessLookupError if the process is gone before its binary is read."""
        key = (functions, http and self.http_allowed)
        cache = self._caches.get(key)
        if cache is None:
            resolver: Callable[[str], BinaryPlan] = lambda path: plan_binary(  # noqa: E731
                path, list(key[0]), self.names, key[1], _exe_of(path), self.limits
            )
            cache = self._caches[key] = ResolveOnceCache(resolver)
        misses = cache.misses
        try:
            return Planned(cache.get(pid), None, cache.misses != misses)
        except AgentError as exc:
            return Planned(None, exc, cache.misses != misses)


def _exe_of(path: str) -> str:
    """The executable's own path for messages (`path` is /proc/PID/exe)."""
    try:
        return os.readlink(path).removesuffix(" (deleted)")
    except OSError:
        return path


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
        limits: BinaryLimits | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._rules_file = rules_file
        self._planner = RulePlanner(names, http_allowed, limits)
        # One thread: parses run one at a time (the node has few cores to spare), off the
        # event loop, and the planner's caches are only ever touched from it.
        self._parser = ThreadPoolExecutor(1, thread_name_prefix="binary-parse")
        self._attaching: dict[int, asyncio.Task[None]] = {}
        self.repeated_failures = 0  # processes of a binary already reported untraceable
        self._tracker = TargetTracker(
            rules,
            self._attach,
            self._detach,
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
        for task in list(self._attaching.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._parser.shutdown(wait=False, cancel_futures=True)

    @property
    def attaching(self) -> int:
        """Processes whose binary is being planned."""
        return len(self._attaching)

    def _attach(self, process: TrackedProcess) -> None:
        """Called by the tracker on the event loop: plan in the worker thread, then attach."""
        pid = process.pid
        task = asyncio.get_running_loop().create_task(self._plan_and_attach(process))
        self._attaching[pid] = task
        task.add_done_callback(
            lambda t: self._attaching.pop(pid, None) if self._attaching.get(pid) is t else None
        )

    def _detach(self, pid: int) -> None:
        task = self._attaching.pop(pid, None)
        if task is not None:
            task.cancel()  # the parse finishes in its thread and is cached for the next one
        self._pipeline.detach(pid)

    async def _plan_and_attach(self, process: TrackedProcess) -> None:
        request = process.request
        rules = ", ".join(request.rules)
        loop = asyncio.get_running_loop()
        try:
            planned = await loop.run_in_executor(
                self._parser, self._planner.plan, process.pid, tuple(request.functions),
                request.http,
            )  # fmt: skip
        except ProcessLookupError:
            return  # exited before its binary was read
        except Exception:  # a bug, not the binary: say so, and keep tracing the others
            log.exception("pid %d (%s): planning its probes failed", process.pid, process.exe)
            return
        if planned.fresh:  # a binary was parsed: its transient memory goes back
            await loop.run_in_executor(self._parser, release_free_memory)
        if planned.error is not None:
            if planned.fresh:  # one line per binary, however many processes run it
                log.warning("pid %d (%s) matched %s but cannot be traced: %s",
                            process.pid, process.exe, rules, planned.error)  # fmt: skip
            else:
                self.repeated_failures += 1
                log.debug("pid %d (%s): %s (reported before)", process.pid, process.exe,
                          planned.error)  # fmt: skip
            return
        assert planned.plan is not None
        plan = planned.plan
        try:
            target = bind_process(process.pid, plan)
            if not await self._pipeline.attach_running(target, k8s=process.event_fields()):
                log.debug("pid %d (%s) exited while its probes were attached", process.pid,
                          process.exe)  # fmt: skip
                return
        except (AgentError, ProcessLookupError, FileNotFoundError) as exc:
            # A process that exited before its probes were in place is churn, not a fault:
            # thousands a minute on a busy node would bury the real warnings.
            gone = not os.path.exists(f"/proc/{process.pid}")
            log.log(logging.DEBUG if gone else logging.WARNING,
                    "pid %d (%s) matched %s but cannot be traced: %s",
                    process.pid, process.exe, rules, exc)  # fmt: skip
            return
        log.info("pid %d (%s) selected by %s: %d function(s) probed", process.pid,
                 process.exe, rules, len(plan.functions))  # fmt: skip

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
