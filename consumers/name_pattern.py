"""Workload and operation patterns of `query` and alert rules: the text itself, where `*`
matches any run of characters (`GET /api/*`, `shop/*`). Nothing else is special, so routes
with `{id}`, `[`, `?` or `.` match literally."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class NamePattern:
    text: str

    @property
    def exact(self) -> str | None:
        """The one name this pattern matches, if it has no wildcard."""
        return None if "*" in self.text else self.text

    def matches(self, name: str) -> bool:
        return bool(_compile(self.text).fullmatch(name))


_cache: dict[str, re.Pattern[str]] = {}


def _compile(text: str) -> re.Pattern[str]:
    found = _cache.get(text)
    if found is None:
        found = _cache[text] = re.compile(".*".join(re.escape(p) for p in text.split("*")), re.S)
    return found
