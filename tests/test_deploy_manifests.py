"""deploy/: the rendered manifests validate offline against the Kubernetes schemas, follow
the privilege and resource policy, and keep the co-partitioned topics equal.

Rendering uses `kustomize build` or `kubectl kustomize` when one is installed, else a small
renderer of the features deploy/ uses (resources, namespace, labels, images, JSON 6902
patches); when a binary is there, a test checks the two agree."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from producer.target_rules import parse_target_rules

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
TREES = {"base": DEPLOY / "base", "local": DEPLOY / "overlays" / "local"}
KUBERNETES_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
AGENT_CAPABILITIES = {"BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
POD_TEMPLATE_KINDS = {"DaemonSet", "Deployment", "StatefulSet", "Job", "ReplicaSet"}
Doc = dict[str, Any]


# --- rendering -------------------------------------------------------------------------------


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_with_binary(tree: Path) -> list[Doc]:
    command = _kustomize_command()
    assert command is not None
    out = subprocess.run([*command, str(tree)], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_by_hand(tree: Path) -> list[Doc]:
    spec = yaml.safe_load((tree / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for entry in spec.get("resources", []):
        path = (tree / entry).resolve()
        if path.is_dir():
            docs.extend(render_by_hand(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    unknown = set(spec) - {
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "labels",
        "images",
        "patches",
    }
    assert not unknown, f"{tree}: the hand renderer does not know {unknown}"
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if "namespace" in spec and doc["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = spec["namespace"]
        for label in spec.get("labels", []):
            assert not label.get("includeSelectors") and not label.get("includeTemplates")
            meta.setdefault("labels", {}).update(label["pairs"])
        for image in spec.get("images", []):
            for container in _containers(doc):
                name, _, _tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
        for patch in spec.get("patches", []):
            target = patch["target"]
            if doc["kind"] == target["kind"] and target.get("name") in (None, meta["name"]):
                for op in yaml.safe_load(patch["patch"]):
                    _json_patch(doc, op)
    return docs


def _json_patch(doc: Doc, op: dict[str, Any]) -> None:
    *parents, last = [
        p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")
    ]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op["op"] in ("replace", "add"):
        assert op["op"] == "add" or last in node, f"replace of missing {op['path']}"
        node[last] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del node[last]
    else:
        raise AssertionError(f"unsupported patch op {op['op']}")


def render(tree: Path) -> list[Doc]:
    return render_with_binary(tree) if _kustomize_command() else render_by_hand(tree)


def _key(doc: Doc) -> tuple[str, str, str, str]:
    meta = doc["metadata"]
    return (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])


def _pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] in POD_TEMPLATE_KINDS:
        return dict(doc["spec"]["template"]["spec"])
    if doc["kind"] == "Pod":
        return dict(doc["spec"])
    return None


def _containers(doc: Doc) -> list[Doc]:
    spec = _pod_spec(doc)
    if spec is None:
        return []
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


@pytest.fixture(scope="module", params=sorted(TREES))
def rendered(request: pytest.FixtureRequest) -> list[Doc]:
    return render(TREES[request.param])


# --- validation ----------------------------------------------------------------------------

STRIMZI_SCHEMAS: dict[str, Doc] = {
    # The fields deploy/ uses, as Strimzi's CRDs (v1beta2) define them; no other keys allowed.
    "KafkaTopic": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "metadata": {
                "type": "object",
                "required": ["labels"],
                "properties": {
                    "labels": {
                        "type": "object",
                        "required": ["strimzi.io/cluster"],
                    }
                },
            },
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["partitions", "replicas"],
                "properties": {
                    "topicName": {"type": "string", "pattern": r"^[a-zA-Z0-9._-]{1,249}$"},
                    "partitions": {"type": "integer", "minimum": 1},
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                    "config": {
                        "type": "object",
                        "additionalProperties": {"type": ["string", "integer", "boolean"]},
                    },
                },
            },
        },
    },
    "KafkaNodePool": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["replicas", "roles", "storage"],
                "properties": {
                    "replicas": {"type": "integer", "minimum": 0},
                    "roles": {
                        "type": "array",
                        "items": {"enum": ["controller", "broker"]},
                        "minItems": 1,
                    },
                    "storage": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {"type": {"enum": ["ephemeral", "persistent-claim", "jbod"]}},
                    },
                    "resources": {"type": "object"},
                },
            }
        },
    },
    "Kafka": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["kafka"],
                "properties": {
                    "kafka": {
                        "type": "object",
                        "required": ["listeners"],
                        "properties": {
                            "listeners": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["name", "port", "type", "tls"],
                                    "properties": {
                                        "name": {"type": "string", "pattern": "^[a-z0-9]{1,11}$"},
                                        "port": {"type": "integer", "minimum": 9092},
                                        "type": {
                                            "enum": [
                                                "internal",
                                                "route",
                                                "loadbalancer",
                                                "nodeport",
                                                "ingress",
                                                "cluster-ip",
                                            ]
                                        },
                                        "tls": {"type": "boolean"},
                                    },
                                },
                            },
                            "config": {"type": "object"},
                        },
                    },
                    "entityOperator": {"type": "object"},
                },
            }
        },
    },
}


def test_every_manifest_validates_offline(rendered: list[Doc]) -> None:
    assert rendered
    for doc in rendered:
        where = "/".join(_key(doc))
        if doc["apiVersion"].startswith("kafka.strimzi.io/"):
            # Strimzi's CRDs are not in the Kubernetes schemas: checked against the subset
            # of them above instead.
            assert doc["apiVersion"] == "kafka.strimzi.io/v1beta2", where
            jsonschema.validate(doc, STRIMZI_SCHEMAS[doc["kind"]])
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{where} (Kubernetes {version}): {exc.message}") from None


def test_the_hand_renderer_agrees_with_kustomize() -> None:
    if _kustomize_command() is None:
        pytest.skip("no kustomize or kubectl: the hand renderer is all there is")
    for name, tree in TREES.items():
        by_binary = {_key(d): d for d in render_with_binary(tree)}
        by_hand = {_key(d): d for d in render_by_hand(tree)}
        assert by_binary == by_hand, name


# --- policy ------------------------------------------------------------------------------


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    found = [(path, node)]
    if isinstance(node, dict):
        for k, v in node.items():
            found += _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _walk(v, f"{path}[{i}]")
    return found


def test_nothing_is_privileged(rendered: list[Doc]) -> None:
    for doc in rendered:
        for path, value in _walk(doc):
            if path.endswith(".privileged"):
                assert value is False, f"{_key(doc)}{path}"
        spec = _pod_spec(doc) or {}
        assert not spec.get("hostNetwork") and not spec.get("hostIPC"), _key(doc)


def test_every_container_has_requests_and_limits(rendered: list[Doc]) -> None:
    containers = [(doc, c) for doc in rendered for c in _containers(doc)]
    assert len(containers) == 4  # agent, join, aggregate, alert
    for doc, container in containers:
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(kind, {}), (
                    f"{_key(doc)} container {container['name']}: no {kind}.{resource}"
                )


def test_the_agent_has_exactly_the_listed_capabilities(rendered: list[Doc]) -> None:
    agents = [d for d in rendered if d["kind"] == "DaemonSet"]
    assert len(agents) == 1
    spec = _pod_spec(agents[0])
    assert spec is not None and spec["hostPID"] is True
    (container,) = spec["containers"]
    security = container["securityContext"]
    assert set(security["capabilities"]["add"]) == AGENT_CAPABILITIES
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert "livenessProbe" in container
    # Host paths are mounted read-only, and are the ones the agent needs.
    host_volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert set(host_volumes.values()) == {
        "/sys/kernel/tracing",
        "/sys/kernel/debug",
        "/lib/modules",
        "/usr/src",
    }
    for mount in container["volumeMounts"]:
        if mount["name"] in host_volumes:
            assert mount.get("readOnly") is True, mount["name"]
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # Nobody else gets capabilities or a token.
    for doc in rendered:
        if doc["kind"] == "Deployment":
            pod = _pod_spec(doc)
            assert pod is not None and pod["automountServiceAccountToken"] is False
            for c in pod["containers"]:
                assert "add" not in c["securityContext"].get("capabilities", {}), _key(doc)


def test_rbac_is_get_list_watch_on_pods_only(rendered: list[Doc]) -> None:
    roles = [d for d in rendered if d["kind"] in ("ClusterRole", "Role")]
    assert len(roles) == 1
    assert roles[0]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    (binding,) = [d for d in rendered if d["kind"] == "ClusterRoleBinding"]
    daemonset = next(d for d in rendered if d["kind"] == "DaemonSet")
    account = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": daemonset["metadata"]["namespace"]}
    ]


def test_topics_and_co_partitioning(rendered: list[Doc]) -> None:
    topics = {
        d["spec"].get("topicName", d["metadata"]["name"]): d["spec"]
        for d in rendered
        if d["kind"] == "KafkaTopic"
    }
    assert set(topics) == {
        "apm.uprobe.events",
        "apm.kprobe.events",
        "apm.spans",
        "apm.latency",
        "apm.alerts",
        "apm.deadletter",
    }
    assert topics["apm.uprobe.events"]["partitions"] == topics["apm.kprobe.events"]["partitions"]
    for spec in topics.values():
        assert int(spec["config"]["min.insync.replicas"]) <= spec["replicas"]
    agent = next(d for d in rendered if d["kind"] == "DaemonSet")
    args = agent["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--partitions={topics['apm.uprobe.events']['partitions']}" in args


def test_the_configmap_targets_load(rendered: list[Doc]) -> None:
    (config,) = [d for d in rendered if d["kind"] == "ConfigMap" and "targets.yaml" in d["data"]]
    rules = parse_target_rules(config["data"]["targets.yaml"], "ConfigMap ebpf-apm-config")
    assert rules.rules and rules.uses_kubernetes
    agent = next(d for d in rendered if d["kind"] == "DaemonSet")
    volumes = agent["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config["metadata"]["name"]}} in volumes


def test_dockerfiles() -> None:
    agent = (DEPLOY / "docker" / "agent.Dockerfile").read_text()
    assert "FROM debian:bookworm" in agent and "python3-bpfcc" in agent
    consumer = (DEPLOY / "docker" / "consumer.Dockerfile").read_text()
    assert "USER 10001" in consumer and "bpfcc" not in consumer
