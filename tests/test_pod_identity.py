"""Container id and pod UID from /proc/PID/cgroup: every runtime and driver layout as text,
then real processes in real cgroup v2 directories shaped like a container runtime's."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest
from cgroup_fixtures import Cgroups, cgroups_fixture, child_of, ns_pids  # noqa: F401

from ebpf_apm.producer.pod_identity import CgroupIdentity, parse_cgroup, read_cgroup_identity

CID = "3f2a" + "0123456789abcdef" * 3 + "c0ffee0123ab"  # 64 hex
UID = "8a1f2c3d-4b5e-6f70-8192-a3b4c5d6e7f8"
US = UID.replace("-", "_")
STATIC_UID = "5d4b9e2c8f1a3b7d6e0c9a8b7f6e5d4c"  # static pods: a hash, no dashes

SYSTEMD_PATH = (
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice/"
    f"cri-containerd-{CID}.scope"
)
V1_SYSTEMD_CONTAINERD = (
    f"12:pids:{SYSTEMD_PATH}\n11:memory:{SYSTEMD_PATH}\n1:name=systemd:{SYSTEMD_PATH}\n0::/\n"
)

# (case, /proc/PID/cgroup text, container id, pod uid, runtime, qos)
CASES: list[tuple[str, str, str | None, str | None, str | None, str | None]] = [
    (
        "v2 systemd containerd burstable",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice/"
        f"cri-containerd-{CID}.scope\n",
        CID,
        UID,
        "containerd",
        "burstable",
    ),
    (
        "v2 systemd containerd besteffort",
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{US}.slice/"
        f"cri-containerd-{CID}.scope\n",
        CID,
        UID,
        "containerd",
        "besteffort",
    ),
    (
        "v2 systemd containerd guaranteed",
        f"0::/kubepods.slice/kubepods-pod{US}.slice/cri-containerd-{CID}.scope\n",
        CID,
        UID,
        "containerd",
        "guaranteed",
    ),
    (
        "v2 systemd cri-o",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice/"
        f"crio-{CID}.scope\n",
        CID,
        UID,
        "cri-o",
        "burstable",
    ),
    (
        "v2 systemd docker (cri-dockerd)",
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{US}.slice/"
        f"docker-{CID}.scope\n",
        CID,
        UID,
        "docker",
        "besteffort",
    ),
    (
        "v2 cgroupfs containerd burstable",
        f"0::/kubepods/burstable/pod{UID}/{CID}\n",
        CID,
        UID,
        None,
        "burstable",
    ),
    (
        "v2 cgroupfs guaranteed",
        f"0::/kubepods/pod{UID}/{CID}\n",
        CID,
        UID,
        None,
        "guaranteed",
    ),
    (
        "v2 cgroupfs cri-o besteffort",
        f"0::/kubepods/besteffort/pod{UID}/crio-{CID}\n",
        CID,
        UID,
        "cri-o",
        "besteffort",
    ),
    (
        "v1 systemd containerd (v2 line empty)",
        V1_SYSTEMD_CONTAINERD,
        CID,
        UID,
        "containerd",
        "burstable",
    ),
    (
        "v1 cgroupfs docker",
        f"11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{CID}\n"
        f"5:memory:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/\n",
        CID,
        UID,
        None,
        "besteffort",
    ),
    (
        "v1 systemd cri-o guaranteed",
        f"4:memory:/kubepods.slice/kubepods-pod{US}.slice/crio-{CID}.scope\n",
        CID,
        UID,
        "cri-o",
        "guaranteed",
    ),
    (
        "v2 inside a cgroup namespace (relative path)",
        f"0::/../../kubepods-burstable-pod{US}.slice/cri-containerd-{CID}.scope\n",
        CID,
        UID,
        "containerd",
        "burstable",
    ),
    (
        "v2 kind node nested under its own container",
        f"0::/system.slice/docker-{'ab' * 32}.scope/kubelet.slice/kubelet-kubepods.slice/"
        f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{US}.slice/"
        f"cri-containerd-{CID}.scope\n",
        CID,
        UID,
        "containerd",
        "besteffort",
    ),
    (
        "v2 sub-cgroup below the container",
        f"0::/kubepods.slice/kubepods-pod{US}.slice/cri-containerd-{CID}.scope/init.scope\n",
        CID,
        UID,
        "containerd",
        "guaranteed",
    ),
    (
        "static pod uid",
        f"0::/kubepods/burstable/pod{STATIC_UID}/{CID}\n",
        CID,
        STATIC_UID,
        None,
        "burstable",
    ),
    (
        "pod cgroup itself (no container)",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice\n",
        None,
        UID,
        None,
        "burstable",
    ),
    (
        "docker outside kubernetes, systemd",
        f"0::/system.slice/docker-{CID}.scope\n",
        CID,
        None,
        "docker",
        None,
    ),
    (
        "docker outside kubernetes, cgroupfs v1",
        f"4:memory:/docker/{CID}\n0::/\n",
        CID,
        None,
        None,
        None,
    ),
    (
        "podman",
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope\n",
        CID,
        None,
        "podman",
        None,
    ),
]


@pytest.mark.parametrize(
    ("text", "container", "pod", "runtime", "qos"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_every_layout(
    text: str, container: str | None, pod: str | None, runtime: str | None, qos: str | None
) -> None:
    found = parse_cgroup(text)
    assert found is not None
    assert (found.container_id, found.pod_uid, found.runtime, found.qos) == (
        container,
        pod,
        runtime,
        qos,
    )
    assert found.in_kubernetes == (pod is not None)


@pytest.mark.parametrize(
    "text",
    [
        "0::/\n",
        "0::/user.slice/user-0.slice/session-3.scope\n",
        "12:pids:/system.slice/sshd.service\n0::/system.slice/sshd.service\n",
        "4:memory:/process_api/f29874016e28f8dc3f116a40dd5a2f78\n0::/\n",
        "",
        "garbage without colons\n",
    ],
)
def test_no_container(text: str) -> None:
    assert parse_cgroup(text) is None


def test_cri_o_monitor_is_marked() -> None:
    found = parse_cgroup(f"0::/kubepods.slice/kubepods-pod{US}.slice/crio-conmon-{CID}.scope\n")
    assert found is not None and found.monitor and found.container_id == CID


def test_a_short_hex_segment_is_not_a_container() -> None:
    path = f"/kubepods/burstable/pod{UID}/{CID[:40]}"
    assert parse_cgroup(f"0::{path}\n") == CgroupIdentity(None, UID, None, "burstable", path)


def test_an_exited_process_raises() -> None:
    proc = subprocess.Popen(["/bin/true"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        read_cgroup_identity(proc.pid)


# --- real cgroups -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "runtime", "qos"),
    [
        (
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{us}.slice/"
            "cri-containerd-{cid}.scope",
            "containerd",
            "burstable",
        ),
        ("kubepods/besteffort/pod{uid}/{cid}", None, "besteffort"),
    ],
    ids=["systemd-containerd", "cgroupfs"],
)
def test_real_process_in_a_runtime_shaped_cgroup(
    cgroups: Cgroups, layout: str, runtime: str | None, qos: str
) -> None:
    pod_uid = str(uuid.uuid4())
    container_id = os.urandom(32).hex()
    leaf = cgroups.make(layout.format(us=pod_uid.replace("-", "_"), uid=pod_uid, cid=container_id))
    # The shell joins the cgroup, then becomes unshare, whose child is pid 1 of a new PID
    # namespace with its own mount namespace and /proc: a container without a runtime.
    proc = subprocess.Popen(
        [
            "sh",
            "-c",
            f"echo $$ > {leaf}/cgroup.procs && exec unshare --pid --mount --fork "
            "--mount-proc sleep 30",
        ]
    )
    try:
        child = child_of(proc.pid)
        assert ns_pids(child)[-1] == 1  # pid 1 in its own namespace
        assert os.readlink(f"/proc/{child}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        found = read_cgroup_identity(child)
        assert found is not None
        assert found.container_id == container_id
        assert found.pod_uid == pod_uid
        assert (found.runtime, found.qos) == (runtime, qos)
        # The process outside the new namespaces (unshare itself) is in the same container.
        assert read_cgroup_identity(proc.pid) == found
        os.kill(child, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while (leaf / "cgroup.procs").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)  # the killed pid 1 of the namespace is released a moment later
    assert (leaf / "cgroup.procs").read_text() == ""
