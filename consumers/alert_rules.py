"""Alert rules over closed latency windows, and their evaluation (pure: no clock, no I/O).

A rules file (YAML):

    rules:
      - name: slow-user-lookups
        workload: shop/api              # optional; * matches any run of characters
        operation: GET /api/user/{id}   # optional
        metric: p99                     # count, min, max, mean, p50, p90, p95, p99, p999
        above: 250ms                    # or below:; durations need a unit
        for: 3                          # consecutive windows to fire (default 1)
        resolve_after: 2                # consecutive windows to resolve (default 1)
      - name: user-lookup-errors
        operation: GET /api/user/{id}
        metric: error_rate              # share of the spans in error_classes
        error_classes: [5xx]            # default [5xx]
        above: 5%                       # or 0.05
        min_count: 20                   # windows with fewer spans are skipped (default 1)

A latency rule is evaluated per series (status classes apart; `status_class: 2xx` narrows
it); an error-rate rule per workload and operation over all their HTTP status classes.
A gRPC operation is its full method (`/package.Service/Method`) and its status classes are
the gRPC code names (`OK`, `NOT_FOUND`, ..., `UNAVAILABLE`): an error-rate rule on one names
them, e.g. `error_classes: [UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED]`.
"Consecutive" means adjacent windows: a window without spans (no record) starts the count
again. A rule fires once when the condition held for `for` windows in a row, and resolves
once when it failed for `resolve_after` in a row; each is one Transition. Windows are
evaluated in order; a window at or before the last one evaluated for a subject (a replay)
is ignored.

Errors in a rules file name the file and line: `rules.yaml:7: ...`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ebpf_apm.consumers.errors import ConsumerConfigError
from ebpf_apm.consumers.name_pattern import NamePattern
from ebpf_apm.consumers.route_template import SeriesKey
from ebpf_apm.consumers.series_resolver import GRPC_CODES
from ebpf_apm.consumers.time_spec import parse_duration_ns

DURATION_METRICS = ("min", "max", "mean", "p50", "p90", "p95", "p99", "p999")
METRICS = ("count", *DURATION_METRICS, "error_rate")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "unknown", *GRPC_CODES)
_KEYS = (
    "name",
    "workload",
    "operation",
    "status_class",
    "metric",
    "above",
    "below",
    "for",
    "resolve_after",
    "min_count",
    "error_classes",
)


class RulesError(ConsumerConfigError):
    """A rules file that cannot be used; the message lists each problem with its line, and
    ends with what to do (exit status 2)."""

    def __init__(self, problems: list[str], path: str | None = None) -> None:
        advice = f"fix {path} and run again (see `ebpf-apm alert --help`)" if path else None
        super().__init__("\n".join(problems + ([advice] if advice else [])))
        self.problems = problems


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    comparison: str  # "above" | "below"
    threshold: float  # ns for durations, a fraction for error_rate, spans for count
    workload: NamePattern | None = None
    operation: NamePattern | None = None
    status_class: str | None = None
    for_windows: int = 1
    resolve_after: int = 1
    min_count: int = 1
    error_classes: tuple[str, ...] = ("5xx",)

    def breached(self, value: float) -> bool:
        return value > self.threshold if self.comparison == "above" else value < self.threshold

    def selects(self, workload: str, operation: str) -> bool:
        return (self.workload is None or self.workload.matches(workload)) and (
            self.operation is None or self.operation.matches(operation)
        )


# -- reading a rules file -------------------------------------------------------------------


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, node: yaml.Node, text: str) -> None:
        self.problems.append(f"{self.source}:{node.start_mark.line + 1}: {text}")

    def scalar(self, node: yaml.Node, what: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, f"{what} must be a single value, not a list or mapping")
            return None
        return str(node.value)

    def positive_int(self, node: yaml.Node, what: str) -> int | None:
        text = self.scalar(node, what)
        if text is None:
            return None
        if not text.isdigit() or int(text) < 1:
            self.problem(node, f"{what} must be a whole number of at least 1, got {text!r}")
            return None
        return int(text)

    def threshold(self, node: yaml.Node, metric: str | None, rule: str) -> float | None:
        text = self.scalar(node, "a threshold")
        if text is None:
            return None
        try:
            if metric in DURATION_METRICS:
                if text.strip().replace(".", "", 1).isdigit():
                    raise ValueError(f"{metric} is a duration: give a unit, e.g. {text}ms")
                return float(parse_duration_ns(text))
            if metric == "error_rate":
                rate = float(text[:-1]) / 100 if text.endswith("%") else float(text)
                if not 0.0 <= rate <= 1.0:
                    raise ValueError("an error rate is between 0 and 1 (or 0% and 100%)")
                return rate
            return float(text)
        except ValueError as exc:
            self.problem(node, f"{rule}: bad threshold {text!r}: {exc}")
            return None

    def rule(self, node: yaml.Node, index: int, names: dict[str, int]) -> Rule | None:
        label = f"rule #{index + 1}"
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{label} must be a mapping of keys such as name, metric, above")
            return None
        for key_node, value_node in node.value:
            if key_node.value == "name" and isinstance(value_node, yaml.ScalarNode):
                label = f"rule {value_node.value!r}"
                break
        values: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key not in _KEYS:
                self.problem(key_node, f"{label}: unknown key {key!r}; known: {', '.join(_KEYS)}")
            elif key in values:
                self.problem(key_node, f"{label}: {key!r} is given twice")
            else:
                values[key] = value_node
        before = len(self.problems)
        name = self.scalar(values["name"], "name") if "name" in values else None
        if "name" not in values:
            self.problem(node, f"{label} has no name")
        elif name:
            if name in names:
                self.problem(
                    values["name"], f"{label} is defined twice (first at line {names[name]})"
                )
            names[name] = values["name"].start_mark.line + 1
        metric = self.scalar(values["metric"], "metric") if "metric" in values else None
        if "metric" not in values:
            self.problem(node, f"{label} has no metric; one of: {', '.join(METRICS)}")
        elif metric is not None and metric not in METRICS:
            self.problem(
                values["metric"],
                f"{label}: unknown metric {metric!r}; one of: {', '.join(METRICS)}",
            )
            metric = None
        bounds = [k for k in ("above", "below") if k in values]
        if len(bounds) != 1:
            self.problem(node, f"{label} needs exactly one of above: or below:")
        comparison = bounds[0] if bounds else "above"
        threshold = None
        if bounds and metric is not None:
            threshold = self.threshold(values[comparison], metric, label)
        patterns = {
            k: NamePattern(text)
            for k in ("workload", "operation")
            if k in values and (text := self.scalar(values[k], k)) is not None
        }
        status = (
            self.scalar(values["status_class"], "status_class")
            if ("status_class" in values)
            else None
        )
        if status is not None and status not in STATUS_CLASSES:
            self.problem(
                values["status_class"],
                f"{label}: status_class {status!r} is not one of {', '.join(STATUS_CLASSES)}",
            )
        if status is not None and metric == "error_rate":
            self.problem(
                values["status_class"],
                f"{label}: an error_rate rule covers all "
                "status classes; use error_classes to say which count as errors",
            )
        classes: tuple[str, ...] = ("5xx",)
        if "error_classes" in values:
            classes = self.classes(values["error_classes"], label)
        counts = {
            k: self.positive_int(values[k], f"{label}: {k}")
            for k in ("for", "resolve_after", "min_count")
            if k in values
        }
        if len(self.problems) > before or name is None or metric is None or threshold is None:
            return None
        return Rule(
            name=name,
            metric=metric,
            comparison=comparison,
            threshold=threshold,
            workload=patterns.get("workload"),
            operation=patterns.get("operation"),
            status_class=status,
            for_windows=counts.get("for") or 1,
            resolve_after=counts.get("resolve_after") or 1,
            min_count=counts.get("min_count") or 1,
            error_classes=classes,
        )

    def classes(self, node: yaml.Node, label: str) -> tuple[str, ...]:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        out = []
        before = len(self.problems)
        for item in items:
            text = self.scalar(item, "an error class")
            if text is not None and text not in STATUS_CLASSES:
                self.problem(
                    item, f"{label}: error class {text!r} is not one of {', '.join(STATUS_CLASSES)}"
                )
            elif text is not None:
                out.append(text)
        if not out and len(self.problems) == before:
            self.problem(node, f"{label}: error_classes is empty")
        return tuple(out)


def parse_rules(text: str, source: str = "rules.yaml") -> list[Rule]:
    """The rules of a rules file's text; RulesError names each problem's line."""
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{mark.line + 1}" if mark is not None else "?"
        raise RulesError(
            [f"{source}:{line}: not valid YAML: {exc.problem or exc.context}"]
        ) from None
    except yaml.YAMLError as exc:
        raise RulesError([f"{source}: not valid YAML: {exc}"]) from None
    reader = _Reader(source)
    if document is None:
        raise RulesError([f"{source}:1: the file is empty; it needs `rules:` and a list"])
    if not isinstance(document, yaml.MappingNode):
        reader.problem(document, "the file must be a mapping with `rules:` and a list of rules")
        raise RulesError(reader.problems)
    rules_node = None
    for key_node, value_node in document.value:
        if key_node.value == "rules":
            rules_node = value_node
        else:
            reader.problem(key_node, f"unknown key {key_node.value!r}; only `rules:` is read")
    if rules_node is None:
        reader.problem(document, "no `rules:` list")
        raise RulesError(reader.problems)
    if not isinstance(rules_node, yaml.SequenceNode) or not rules_node.value:
        reader.problem(rules_node, "`rules:` must be a non-empty list (items start with -)")
        raise RulesError(reader.problems)
    names: dict[str, int] = {}
    rules = [reader.rule(node, i, names) for i, node in enumerate(rules_node.value)]
    if reader.problems:
        raise RulesError(reader.problems)
    return [r for r in rules if r is not None]


MAX_RULES_FILE_CHARS = 1 << 20  # a few thousand rules; read no further


def load_rules(path: str) -> list[Rule]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(MAX_RULES_FILE_CHARS + 1)
        if len(text) > MAX_RULES_FILE_CHARS:
            raise RulesError(
                [f"{path}: the rules file is larger than {MAX_RULES_FILE_CHARS} characters"],
                path,
            )
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError([f"{path}: cannot read the rules file: {exc}"], path) from None
    try:
        return parse_rules(text, path)
    except RulesError as exc:
        raise RulesError(exc.problems, path) from None


# -- evaluation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    rule: Rule
    state: str  # "firing" | "resolved"
    subject: SeriesKey
    value: float
    windows: int
    window_start_ns: int
    window_end_ns: int

    @property
    def key(self) -> str:
        return f"{self.rule.name}/{self.subject.series}"

    def message(self) -> str:
        rule = self.rule
        unit_value, unit_threshold = (
            _show(rule.metric, self.value),
            _show(rule.metric, rule.threshold),
        )
        what = f"{rule.metric} of {self.subject.series}"
        windows = f"{self.windows} window{'s' if self.windows != 1 else ''}"
        if self.state == "firing":
            return (
                f"{rule.name} firing: {what} is {unit_value}, {rule.comparison} "
                f"{unit_threshold} for {windows}"
            )
        return (
            f"{rule.name} resolved: {what} is {unit_value}, not {rule.comparison} "
            f"{unit_threshold} for {windows}"
        )

    def as_record(self) -> dict[str, Any]:
        """The apm.alerts record (schemas/alert.avsc)."""
        return {
            "rule": self.rule.name,
            "state": self.state,
            "series": self.subject.series,
            "workload": self.subject.workload,
            "operation": self.subject.operation,
            "status_class": self.subject.status_class,
            "metric": self.rule.metric,
            "comparison": self.rule.comparison,
            "threshold": float(self.rule.threshold),
            "value": float(self.value),
            "windows": self.windows,
            "window_start_ns": self.window_start_ns,
            "window_end_ns": self.window_end_ns,
            "message": self.message(),
        }


def _show(metric: str, value: float) -> str:
    if metric in DURATION_METRICS:
        return f"{value / 1e6:.1f} ms"
    if metric == "error_rate":
        return f"{value * 100:.1f}%"
    return f"{value:g}"


@dataclass
class _State:
    firing: bool = False
    breached: int = 0  # consecutive windows meeting the condition
    cleared: int = 0  # consecutive windows not meeting it
    last_start_ns: int | None = None
    last_end_ns: int | None = None


def metric_value(metric: str, window: Mapping[str, Any]) -> float:
    if metric == "mean":
        return window["sum"] / window["count"] if window["count"] else 0.0
    return float(window[metric])


@dataclass
class AlertEngine:
    """Buffers closed windows (apm.latency records) and evaluates them in window order."""

    rules: list[Rule]
    _pending: dict[int, list[Mapping[str, Any]]] = field(default_factory=dict)
    _states: dict[tuple[str, SeriesKey], _State] = field(default_factory=dict)
    # Rule states (one per rule and series) kept at most; evictions and refusals counted.
    max_states: int = 200_000
    evicted_states: int = 0
    refused_states: int = 0

    @property
    def pending_windows(self) -> list[int]:
        return sorted(self._pending)

    def add(self, window: Mapping[str, Any]) -> None:
        self._pending.setdefault(int(window["window_start_ns"]), []).append(window)

    def evaluate(self, before_ns: int | None = None) -> list[Transition]:
        """Evaluate the pending windows that start before `before_ns` (all if None)."""
        out: list[Transition] = []
        for start in sorted(self._pending):
            if before_ns is not None and start >= before_ns:
                break
            out.extend(self._evaluate_window(self._pending.pop(start)))
        return out

    def _evaluate_window(self, windows: list[Mapping[str, Any]]) -> list[Transition]:
        out: list[Transition] = []
        for rule in self.rules:
            for subject, value, start, end in self._observations(rule, windows):
                transition = self._step(rule, subject, value, start, end)
                if transition is not None:
                    out.append(transition)
        return out

    def _observations(
        self, rule: Rule, windows: Iterable[Mapping[str, Any]]
    ) -> list[tuple[SeriesKey, float, int, int]]:
        chosen = [
            w for w in windows if rule.selects(w["workload"], w["operation"]) and w["count"] > 0
        ]
        if rule.metric != "error_rate":
            return [
                (
                    SeriesKey(w["workload"], w["operation"], w["status_class"]),
                    metric_value(rule.metric, w),
                    w["window_start_ns"],
                    w["window_end_ns"],
                )
                for w in chosen
                if (rule.status_class is None or w["status_class"] == rule.status_class)
                and w["count"] >= rule.min_count
            ]
        totals: dict[SeriesKey, list[int]] = {}
        for w in chosen:
            if w["status_class"] is None:
                continue  # not HTTP: no status to judge
            subject = SeriesKey(w["workload"], w["operation"], None)
            entry = totals.setdefault(subject, [0, 0, w["window_start_ns"], w["window_end_ns"]])
            entry[0] += w["count"]
            if w["status_class"] in rule.error_classes:
                entry[1] += w["count"]
        return [
            (subject, errors / total, start, end)
            for subject, (total, errors, start, end) in sorted(totals.items())
            if total >= rule.min_count
        ]

    def _step(
        self, rule: Rule, subject: SeriesKey, value: float, start: int, end: int
    ) -> Transition | None:
        state = self._states.get((rule.name, subject))
        if state is None:
            if len(self._states) >= self.max_states:
                # Series names come from input: a state that is not firing is dropped to make
                # room (it only delays a new alert by its `for` windows), never a firing one.
                idle = next((k for k, v in self._states.items() if not v.firing), None)
                if idle is None:
                    self.refused_states += 1
                    return None
                del self._states[idle]
                self.evicted_states += 1
            state = self._states[(rule.name, subject)] = _State()
        if state.last_start_ns is not None and start <= state.last_start_ns:
            return None  # a replayed or out-of-order window
        adjacent = state.last_end_ns == start
        state.last_start_ns, state.last_end_ns = start, end
        if rule.breached(value):
            state.breached = state.breached + 1 if adjacent else 1
            state.cleared = 0
            if not state.firing and state.breached >= rule.for_windows:
                state.firing = True
                return Transition(rule, "firing", subject, value, state.breached, start, end)
        else:
            state.cleared = state.cleared + 1 if adjacent else 1
            state.breached = 0
            if state.firing and state.cleared >= rule.resolve_after:
                state.firing = False
                return Transition(rule, "resolved", subject, value, state.cleared, start, end)
        return None
