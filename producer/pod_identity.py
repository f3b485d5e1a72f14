"""Container id and pod UID of a process, from its /proc/PID/cgroup.

Kubelet puts every container in a cgroup named after its pod, and the container runtime names
the container's own cgroup after the container id. The shapes differ by cgroup driver and
runtime; all of these are recognised, in the cgroup v2 line (`0::/...`) or any v1 line:

    systemd driver   kubepods.slice/kubepods-burstable.slice/
                         kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope
                     (QoS slice absent for guaranteed pods; runtime prefixes cri-containerd-,
                     crio-, docker-, libpod-; crio-conmon-<id>.scope is CRI-O's monitor)
    cgroupfs driver  /kubepods/burstable/pod<uid>/<id>      (also crio-<id>, docker-<id>)
    outside k8s      /system.slice/docker-<id>.scope, /docker/<id>, libpod-<id>.scope

The path is read segment by segment, so prefixes (kind's nested nodes, `/../..` when the
reader sits in a cgroup namespace) and sub-cgroups below the container do not matter.
Pure parsing plus one reader of a real pid; nothing here talks to Kubernetes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CgroupIdentity", "parse_cgroup", "read_cgroup_identity"]

_ID = r"[0-9a-f]{64}"
# A container's own cgroup: runtime prefix (or none under cgroupfs), id, optional .scope
_CONTAINER = re.compile(
    rf"^(?:(?P<prefix>cri-containerd|crio-conmon|crio|docker|libpod)-)?(?P<id>{_ID})"
    r"(?:\.scope)?$"
)
_RUNTIMES = {
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "crio-conmon": "cri-o",
    "docker": "docker",
    "libpod": "podman",
}
# systemd: kubepods[-<qos>]-pod<uid>.slice; cgroupfs: pod<uid>. Static pods' UIDs are 32 hex.
_UID = r"[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}"
# (kubelet's --cgroup-root may prefix the slices: kubelet-kubepods-burstable-pod<uid>.slice)
_POD = re.compile(
    rf"^(?:(?:[\w.]+-)?kubepods(?:-(?P<sqos>burstable|besteffort))?-pod(?P<suid>{_UID}|[0-9a-f]{{32}})"
    rf"\.slice|pod(?P<uid>{_UID}|[0-9a-f]{{32}}))$"
)
_QOS_SEGMENTS = {
    "burstable": "burstable",
    "besteffort": "besteffort",
    "kubepods-burstable.slice": "burstable",
    "kubepods-besteffort.slice": "besteffort",
}


@dataclass(frozen=True)
class CgroupIdentity:
    """What a process's cgroup path says about its container and pod."""

    container_id: str | None  # 64 hex; None for a pod's own cgroup (no container below it)
    pod_uid: str | None  # as the API server spells it (dashes); None outside Kubernetes
    runtime: str | None  # containerd, cri-o, docker, podman; None when the path does not say
    qos: str | None  # guaranteed, burstable, besteffort (pods only)
    cgroup_path: str
    monitor: bool = False  # CRI-O's conmon, which watches the container from outside it

    @property
    def in_kubernetes(self) -> bool:
        return self.pod_uid is not None


def _from_path(path: str) -> CgroupIdentity | None:
    segments = [s for s in path.split("/") if s and s != ".."]
    pod_at = None
    uid = qos = None
    for i, seg in enumerate(segments):
        match = _POD.match(seg)
        if match:
            pod_at = i
            uid = (match.group("suid") or match.group("uid")).replace("_", "-").lower()
            qos = match.group("sqos")
            if qos is None:
                before = segments[i - 1] if i > 0 else ""
                qos = _QOS_SEGMENTS.get(before, "guaranteed")
            break
    # The container is the segment right after the pod; outside Kubernetes, the last one
    # that looks like a container.
    candidates = segments[pod_at + 1 : pod_at + 2] if pod_at is not None else segments[::-1]
    for seg in candidates:
        match = _CONTAINER.match(seg)
        if match:
            prefix = match.group("prefix")
            return CgroupIdentity(
                container_id=match.group("id"),
                pod_uid=uid,
                runtime=_RUNTIMES.get(prefix) if prefix else None,
                qos=qos,
                cgroup_path=path,
                monitor=prefix == "crio-conmon",
            )
    if uid is not None:
        return CgroupIdentity(None, uid, None, qos, path)
    return None


def parse_cgroup(text: str) -> CgroupIdentity | None:
    """Identity from the text of /proc/PID/cgroup, or None when it shows no container.

    The cgroup v2 line wins when it names a container; otherwise the v1 line that says the
    most (pod and container over container alone over pod alone)."""
    best: tuple[int, CgroupIdentity] | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        found = _from_path(parts[2].strip())
        if found is None:
            continue
        score = (2 if found.container_id else 0) + (1 if found.pod_uid else 0)
        score = score * 2 + (1 if parts[0] == "0" else 0)  # ties go to the v2 line
        if best is None or score > best[0]:
            best = (score, found)
    return best[1] if best else None


def read_cgroup_identity(pid: int, proc: str = "/proc") -> CgroupIdentity | None:
    """Identity of a running process; ProcessLookupError when it has exited."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            text = f.read()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    return parse_cgroup(text)
