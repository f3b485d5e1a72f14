"""`ebpf-apm agent --config targets.yaml`: which processes to trace, and what in them.

    targets:
      - name: checkout-http            # unique; shown in logs
        select:                        # every key given must match (AND); at least one key
          namespaces: [shop, "team-*"] # Kubernetes namespace (glob); a list is any-of
          podSelector:                 # Kubernetes label selector of the pod
            matchLabels: {app: checkout}
            matchExpressions:
              - {key: tier, operator: In, values: [web, api]}
          containers: [server]         # container name in the pod spec (glob)
          exeNames: ["checkout*"]      # executable's file name (glob)
          exePaths: ["/app/**"]        # executable's path inside its container (glob)
        http: true                     # time Go net/http requests (default true)
        functions:                     # symbols to time (optional when http is on)
          - main.(*server).handleOrder

Globs: `*` any run of characters except `/`, `**` any run including `/`, `?` one character,
`[abc]`, `[a-z]`, `[!abc]` classes. Kubernetes selectors never match a process outside
Kubernetes. The same file works from a ConfigMap mount. Parsing is strict: an unknown key,
a wrong type, a duplicate key or a bad glob is an error that names the file and the line.
Pure: the caller gathers the facts of a process; nothing here reads /proc or the API.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ebpf_apm.producer.errors import TargetError

__all__ = [
    "LabelRequirement",
    "ProbeRequest",
    "ProcessFacts",
    "TargetRule",
    "TargetRules",
    "TargetRulesError",
    "TargetRulesFile",
    "compile_glob",
    "load_target_rules",
    "parse_target_rules",
]


class TargetRulesError(TargetError):
    """A targets file is malformed; the message starts with FILE:LINE."""


@dataclass(frozen=True)
class ProcessFacts:
    """What a rule can test about one process; Kubernetes fields are None outside it."""

    exe_path: str  # as the process sees it (readlink /proc/PID/exe)
    exe_name: str
    namespace: str | None = None
    container: str | None = None
    pod_labels: Mapping[str, str] | None = None

    @classmethod
    def of(
        cls,
        exe_path: str,
        namespace: str | None = None,
        container: str | None = None,
        pod_labels: Mapping[str, str] | None = None,
    ) -> ProcessFacts:
        exe_path = exe_path.removesuffix(" (deleted)")
        return cls(exe_path, os.path.basename(exe_path), namespace, container, pod_labels)


@dataclass(frozen=True)
class Glob:
    text: str
    regex: re.Pattern[str]

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "Exists":
            return present
        if self.operator == "DoesNotExist":
            return not present
        if self.operator == "In":
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values  # NotIn


@dataclass(frozen=True)
class TargetRule:
    name: str
    line: int
    functions: tuple[str, ...]
    http: bool
    namespaces: tuple[Glob, ...] | None = None
    pod_labels: tuple[LabelRequirement, ...] | None = None
    containers: tuple[Glob, ...] | None = None
    exe_names: tuple[Glob, ...] | None = None
    exe_paths: tuple[Glob, ...] | None = None

    @property
    def uses_kubernetes(self) -> bool:
        return any(s is not None for s in (self.namespaces, self.pod_labels, self.containers))

    def matches(self, facts: ProcessFacts) -> bool:
        checks: list[tuple[Any, Callable[[], bool]]] = [
            (self.exe_names, lambda: _any(self.exe_names, facts.exe_name)),
            (self.exe_paths, lambda: _any(self.exe_paths, facts.exe_path)),
            (self.namespaces, lambda: _any(self.namespaces, facts.namespace)),
            (self.containers, lambda: _any(self.containers, facts.container)),
            (
                self.pod_labels,
                lambda: (
                    facts.pod_labels is not None
                    and all(r.matches(facts.pod_labels) for r in self.pod_labels or ())
                ),
            ),
        ]
        return all(test() for selector, test in checks if selector is not None)


def _any(globs: tuple[Glob, ...] | None, value: str | None) -> bool:
    return value is not None and any(g.matches(value) for g in globs or ())


@dataclass(frozen=True)
class ProbeRequest:
    """What to probe in one process: the union over every rule that selected it."""

    functions: tuple[str, ...]
    http: bool
    rules: tuple[str, ...]


@dataclass(frozen=True)
class TargetRules:
    rules: tuple[TargetRule, ...]
    source: str = "<string>"

    @property
    def uses_kubernetes(self) -> bool:
        """True when some rule needs pod facts: wait for pod metadata before deciding."""
        return any(r.uses_kubernetes for r in self.rules)

    @property
    def uses_container_names(self) -> bool:
        """True when some rule selects by container name, which the API reports a moment
        after the container starts (its pod's namespace and labels are known before)."""
        return any(r.containers is not None for r in self.rules)

    def match(self, facts: ProcessFacts) -> list[TargetRule]:
        return [r for r in self.rules if r.matches(facts)]

    def plan(self, facts: ProcessFacts) -> ProbeRequest | None:
        matched = self.match(facts)
        if not matched:
            return None
        functions: dict[str, None] = {}
        for rule in matched:
            functions.update(dict.fromkeys(rule.functions))
        return ProbeRequest(
            tuple(functions), any(r.http for r in matched), tuple(r.name for r in matched)
        )


# --- globs -------------------------------------------------------------------------------


def compile_glob(text: str, path: bool = False) -> Glob:
    """A glob as a regex; ValueError says what is wrong with it."""
    if not text:
        raise ValueError("empty glob")
    if path and not (text.startswith("/") or text.startswith("**")):
        raise ValueError(f"path glob {text!r} must start with / (paths are absolute)")
    if not path and "**" in text:
        raise ValueError(f"glob {text!r}: ** only means something in exePaths")
    if not path and "/" in text:
        raise ValueError(f"glob {text!r} matches a name, which has no /; use exePaths")
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "*":
            run = len(text) - i - len(text[i:].lstrip("*"))
            if run > 2:
                raise ValueError(f"glob {text!r}: {'*' * run} at column {i + 1}; use * or **")
            out.append(".*" if run == 2 or not path else "[^/]*")
            i += run
        elif c == "?":
            out.append("[^/]" if path else ".")
            i += 1
        elif c == "[":
            end = text.find("]", i + 1)
            if end < 0:
                raise ValueError(f"glob {text!r}: [ at column {i + 1} is never closed")
            out.append(_glob_class(text, text[i + 1 : end], i))
            i = end + 1
        elif c == "]":
            raise ValueError(f"glob {text!r}: ] at column {i + 1} closes nothing")
        elif c == "\\":
            if i + 1 >= len(text):
                raise ValueError(f"glob {text!r}: ends with a lone backslash")
            out.append(re.escape(text[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return Glob(text, re.compile("".join(out), re.DOTALL))


def _glob_class(text: str, body: str, at: int) -> str:
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    if not body:
        raise ValueError(f"glob {text!r}: empty character class at column {at + 1}")
    parts, j = [], 0
    while j < len(body):
        if j + 2 < len(body) and body[j + 1] == "-":
            lo, hi = body[j], body[j + 2]
            if lo > hi:
                raise ValueError(f"glob {text!r}: range {lo}-{hi} is reversed")
            parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
            j += 3
        else:
            parts.append(re.escape(body[j]))
            j += 1
    return f"[{'^' if negate else ''}{''.join(parts)}]"


# --- strict YAML -------------------------------------------------------------------------

_STR = "tag:yaml.org,2002:str"
_BOOL_TEXT = {"true": True, "false": False}
_RULE_KEYS = ("name", "select", "functions", "http")
_SELECT_KEYS = ("namespaces", "podSelector", "containers", "exeNames", "exePaths")
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, node: yaml.Node | None, message: str) -> TargetRulesError:
        line = node.start_mark.line + 1 if node is not None else 1
        return TargetRulesError(f"{self.source}:{line}: {message}")

    def mapping(
        self, node: yaml.Node, what: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping of keys to values")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            name = self.string(key, f"a key of {what}")
            if name not in allowed:
                raise self.fail(
                    key, f"unknown key {name!r} in {what}; expected one of: {', '.join(allowed)}"
                )
            if name in out:
                raise self.fail(key, f"duplicate key {name!r} in {what}")
            out[name] = (key, value)
        return out

    def string(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR or node.value == "":
            raise self.fail(node, f"{what} must be a non-empty string")
        return str(node.value)

    def label_value(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a string")
        return str(node.value)

    def boolean(self, node: yaml.Node, what: str) -> bool:
        value = _BOOL_TEXT.get(node.value.lower()) if isinstance(node, yaml.ScalarNode) else None
        if value is None:
            raise self.fail(node, f"{what} must be true or false")
        return value

    def strings(self, node: yaml.Node, what: str) -> list[tuple[yaml.Node, str]]:
        """A list of strings; a single string is a list of one."""
        if isinstance(node, yaml.ScalarNode):
            return [(node, self.string(node, what))]
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, f"{what} must be a string or a non-empty list of strings")
        return [(item, self.string(item, f"each entry of {what}")) for item in node.value]

    def globs(self, node: yaml.Node, what: str, path: bool = False) -> tuple[Glob, ...]:
        out = []
        for item, text in self.strings(node, what):
            try:
                out.append(compile_glob(text, path))
            except ValueError as exc:
                raise self.fail(item, f"bad glob in {what}: {exc}") from None
        return tuple(out)

    def selector(self, node: yaml.Node) -> tuple[LabelRequirement, ...]:
        keys = self.mapping(node, "podSelector", ("matchLabels", "matchExpressions"))
        if not keys:
            raise self.fail(node, "podSelector needs matchLabels or matchExpressions")
        found: list[LabelRequirement] = []
        if "matchLabels" in keys:
            labels = keys["matchLabels"][1]
            if not isinstance(labels, yaml.MappingNode) or not labels.value:
                raise self.fail(labels, "matchLabels must be a non-empty mapping")
            for k, v in labels.value:
                key = self.string(k, "a label key")
                found.append(
                    LabelRequirement(key, "In", frozenset([self.label_value(v, f"label {key}")]))
                )
        if "matchExpressions" in keys:
            exprs = keys["matchExpressions"][1]
            if not isinstance(exprs, yaml.SequenceNode) or not exprs.value:
                raise self.fail(exprs, "matchExpressions must be a non-empty list")
            for expr in exprs.value:
                found.append(self.expression(expr))
        return tuple(found)

    def expression(self, node: yaml.Node) -> LabelRequirement:
        keys = self.mapping(node, "a matchExpressions entry", ("key", "operator", "values"))
        for required in ("key", "operator"):
            if required not in keys:
                raise self.fail(node, f"a matchExpressions entry needs {required!r}")
        key = self.string(keys["key"][1], "key")
        op_node = keys["operator"][1]
        operator = self.string(op_node, "operator")
        if operator not in _OPERATORS:
            raise self.fail(op_node, f"operator {operator!r}: use one of {', '.join(_OPERATORS)}")
        values: frozenset[str] = frozenset()
        if operator in ("In", "NotIn"):
            if "values" not in keys:
                raise self.fail(node, f"operator {operator} needs values")
            values = frozenset(text for _, text in self.strings(keys["values"][1], "values"))
        elif "values" in keys:
            raise self.fail(keys["values"][0], f"operator {operator} takes no values")
        return LabelRequirement(key, operator, values)

    def rule(self, node: yaml.Node, names: set[str]) -> TargetRule:
        keys = self.mapping(node, "a target", _RULE_KEYS)
        for required in ("name", "select"):
            if required not in keys:
                raise self.fail(node, f"a target needs {required!r}")
        name_node = keys["name"][1]
        name = self.string(name_node, "name")
        if name in names:
            raise self.fail(name_node, f"target name {name!r} is used twice")
        names.add(name)
        select_node = keys["select"][1]
        select = self.mapping(select_node, f"select of target {name!r}", _SELECT_KEYS)
        if not select:
            raise self.fail(select_node, f"target {name!r} selects nothing: give a select key")

        def get(key: str) -> yaml.Node | None:
            return select[key][1] if key in select else None

        http = self.boolean(keys["http"][1], "http") if "http" in keys else True
        functions = (
            tuple(text for _, text in self.strings(keys["functions"][1], "functions"))
            if "functions" in keys
            else ()
        )
        if not http and not functions:
            raise self.fail(node, f"target {name!r} traces nothing: give functions or http")
        ns, pods, cont, names_, paths = (get(k) for k in _SELECT_KEYS)
        return TargetRule(
            name=name,
            line=node.start_mark.line + 1,
            functions=functions,
            http=http,
            namespaces=self.globs(ns, "namespaces") if ns is not None else None,
            pod_labels=self.selector(pods) if pods is not None else None,
            containers=self.globs(cont, "containers") if cont is not None else None,
            exe_names=self.globs(names_, "exeNames") if names_ is not None else None,
            exe_paths=self.globs(paths, "exePaths", path=True) if paths is not None else None,
        )


def parse_target_rules(text: str, source: str = "<string>") -> TargetRules:
    reader = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise TargetRulesError(f"{source}:{line}: not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise TargetRulesError(f"{source}: not valid YAML: {exc}") from None
    if root is None:
        raise TargetRulesError(f"{source}:1: the file is empty; it needs a `targets:` list")
    top = reader.mapping(root, "the file", ("targets",))
    if "targets" not in top:
        raise reader.fail(root, "the file needs a `targets:` list")
    targets = top["targets"][1]
    if not isinstance(targets, yaml.SequenceNode) or not targets.value:
        raise reader.fail(targets, "targets must be a non-empty list")
    names: set[str] = set()
    return TargetRules(tuple(reader.rule(item, names) for item in targets.value), source)


def load_target_rules(path: str | Path) -> TargetRules:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TargetRulesError(f"{path}: cannot read the targets file: {exc.strerror}") from exc
    return parse_target_rules(text, str(path))


@dataclass
class TargetRulesFile:
    """A targets file that may change under the agent (a ConfigMap mount swaps a symlink).

    `reload_if_changed()` returns new rules when the file's content changed, else None; a
    changed file that no longer parses raises, and the caller keeps the rules it had."""

    path: Path
    _signature: tuple[int, int, int] | None = field(default=None, init=False)

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)  # follows ..data symlinks to the current version
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> TargetRules:
        signature = self._stat()
        rules = load_target_rules(self.path)
        self._signature = signature
        return rules

    def reload_if_changed(self) -> TargetRules | None:
        try:
            signature = self._stat()
        except OSError:
            return None  # mid-swap, or gone: keep the current rules
        if signature == self._signature:
            return None
        rules = load_target_rules(self.path)
        self._signature = signature
        return rules
