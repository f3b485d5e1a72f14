"""URL path segments that must not leave the node, replaced before a span batch is encoded.

    /api/users/jane@example.com/keys/3f2a9c0d1e4b5a6f7788  ->  /api/users/:redacted/keys/:redacted
    /reset/eyJhbGciOi...J9.eyJzdWIiOi...fQ.SflKxwRJ...?t=1  ->  /reset/:redacted

Paths can carry tokens, e-mail addresses and API keys; the agent is the last place that can
keep them on the node (they would reach three topics, storage and logs). Each segment
(between slashes) is matched whole against the patterns; a match becomes `PLACEHOLDER`.
A query string never leaves: it is cut off (net/http's URL.Path has none; a raw path might).

Default patterns (on unless `--no-default-redaction`):
  email       something@domain.tld
  uuid        8-4-4-4-12 hex digits
  hex key     16 or more hex digits
  jwt         three dot-separated base64url parts of 8 or more characters each
  long token  20 or more of [A-Za-z0-9_-] with at least one digit and one letter
              (API keys, session ids; a long all-letter word such as a route name stays)
`--redact-path PATTERN` (repeatable) adds regular expressions, also matched against whole
segments: `--redact-path '[0-9]{6,}'` hides long numbers, `--redact-path 'acct-.*'` a
naming scheme of your own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ebpf_apm.producer.errors import TargetError

PLACEHOLDER = ":redacted"

DEFAULT_PATTERNS: dict[str, str] = {
    "email": r"[^@\s]+@[^@\s]+\.[^@\s]+",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "hex key": r"[0-9a-fA-F]{16,}",
    "jwt": r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    "long token": r"(?=[A-Za-z0-9_-]*[0-9])(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{20,}",
}
# No default pattern matches a segment shorter than this without '@' (the e-mail rule).
_SHORTEST_DEFAULT = 16


class PathRedactor:
    """Replaces matching path segments; built once from the agent's options."""

    def __init__(self, patterns: Sequence[str] = (), *, defaults: bool = True) -> None:
        self.defaults = defaults
        self.patterns = tuple(patterns)
        self._defaults = re.compile("|".join(f"(?:{p})" for p in DEFAULT_PATTERNS.values()))
        self._custom: list[re.Pattern[str]] = []
        for pattern in self.patterns:
            try:
                self._custom.append(re.compile(pattern))
            except re.error as exc:
                raise TargetError(
                    f"--redact-path {pattern!r} is not a regular expression ({exc}); "
                    "give a Python regular expression matched against one whole path segment"
                ) from exc

    @property
    def active(self) -> bool:
        return self.defaults or bool(self._custom)

    def _secret(self, segment: str) -> bool:
        if not segment:
            return False
        could_match = len(segment) >= _SHORTEST_DEFAULT or "@" in segment
        if self.defaults and could_match and self._defaults.fullmatch(segment):
            return True
        return any(p.fullmatch(segment) for p in self._custom)

    def redact(self, path: str) -> str:
        """The path without its query string and with every secret segment replaced."""
        path = path.split("?", 1)[0]
        if not self.active:
            return path
        segments = path.split("/")
        if not any(self._secret(s) for s in segments):
            return path
        return "/".join(PLACEHOLDER if self._secret(s) else s for s in segments)

    def describe(self) -> str:
        """What is redacted, for the agent's start-up line."""
        parts = [", ".join(DEFAULT_PATTERNS)] if self.defaults else []
        parts += [f"/{p}/" for p in self.patterns]
        return "; ".join(parts) if parts else "nothing but query strings"
