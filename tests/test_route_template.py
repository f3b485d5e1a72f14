"""Route templating (one path and many at once), series keys and the cardinality cap."""

from __future__ import annotations

import logging
import random
import uuid

import numpy as np
import pytest

from ebpf_apm.consumers.route_template import (
    OVERFLOW_OPERATION,
    SeriesKey,
    SeriesRegistry,
    route_hashes,
    route_of,
)
from ebpf_apm.consumers.series_resolver import SeriesResolver
from ebpf_apm.consumers.span_columns import decode_spans
from ebpf_apm.schemas.avro_codec import codec


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/api/user/123", "/api/user/{id}"),
        ("/api/user/123/orders/9", "/api/user/{id}/orders/{id}"),
        ("/orders/5f1c0e7a9b2d4c3e8f6a7b1c/items", "/orders/{id}/items"),
        ("/x/123e4567-e89b-12d3-a456-426614174000", "/x/{id}"),
        ("/x/123E4567-E89B-12D3-A456-426614174000/y", "/x/{id}/y"),
        ("/x/123e4567-e89b-12d3-a456-42661417400z", "/x/123e4567-e89b-12d3-a456-42661417400z"),
        ("/x/123e4567e89b-12d3-a456-4266141740001", "/x/123e4567e89b-12d3-a456-4266141740001"),
        ("/blob/deadbeef", "/blob/deadbeef"),  # a word made of hex letters stays
        ("/blob/deadbeef1", "/blob/{id}"),
        ("/v1/users", "/v1/users"),
        ("/api/abc123", "/api/abc123"),  # too short for a hex id
        ("/", "/"),
        ("", ""),
        ("//a//", "//a//"),
        ("/2024/07/report", "/{id}/{id}/report"),
        ("/café/42", "/café/{id}"),
        ("/٣", "/٣"),  # a non-ASCII digit is not a number here
        ("relative/7", "relative/{id}"),
    ],
)
def test_route_of(path: str, route: str) -> None:
    assert route_of(path) == route


def random_segment(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 12)))
    if kind == 1:
        text = str(uuid.UUID(int=rng.getrandbits(128)))
        return text.upper() if rng.random() < 0.3 else text
    if kind == 2:
        return "".join(rng.choice("0123456789abcdef") for _ in range(rng.randrange(6, 41)))
    if kind == 3:
        return "".join(rng.choice("abcdef") for _ in range(rng.randrange(1, 12)))
    if kind == 4:
        return ""
    if kind == 5:  # almost a UUID
        text = list(str(uuid.UUID(int=rng.getrandbits(128))))
        text[rng.randrange(36)] = rng.choice("-xg0")
        return "".join(text)
    if kind == 6:
        return "".join(rng.choice("é€ü٣") for _ in range(rng.randrange(1, 4)))
    if kind == 7:
        return "x" * rng.randrange(1000, 1200)  # longer than LONG_SEGMENT
    return rng.choice(["api", "user", "orders", "v1", "{id}", "items", "a-b", "health"])


def test_vectorised_routes_agree_with_route_of() -> None:
    """Equal hashes exactly when route_of gives equal routes, over random paths."""
    rng = random.Random(11)
    paths = []
    for _ in range(6000):
        segments = [random_segment(rng) for _ in range(rng.randrange(1, 7))]
        paths.append(("/" if rng.random() < 0.9 else "") + "/".join(segments))
    paths += ["", "/", "//", "/api/user/1", "/api/user/2", "/api/user/{id}"]
    encoded = [p.encode() for p in paths]
    lengths = np.array([len(b) for b in encoded], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    buf = np.frombuffer(b"".join(encoded) + bytes(16), dtype=np.uint8)
    hashes = route_hashes(buf, starts, lengths).tolist()
    by_hash: dict[int, set[str]] = {}
    by_route: dict[str, set[int]] = {}
    for path, h in zip(paths, hashes, strict=True):
        by_hash.setdefault(h, set()).add(route_of(path))
        by_route.setdefault(route_of(path), set()).add(h)
    assert all(len(routes) == 1 for routes in by_hash.values())
    # A literal "{id}" segment and an id share a route but not a hash; anything else hashes
    # one way per route.
    split = {r: hs for r, hs in by_route.items() if len(hs) > 1}
    assert all("{id}" in r for r in split), split
    assert len(by_hash) > 3000  # the test is not vacuous
    shuffled = route_hashes(buf, starts[::-1].copy(), lengths[::-1].copy()).tolist()
    assert shuffled == hashes[::-1]  # a path's hash does not depend on its neighbours


def test_series_key_string_escapes_separators() -> None:
    assert SeriesKey("shop/api", "GET /a|b", "2xx").series == "shop/api|GET /a%7Cb|2xx"
    assert SeriesKey("w", "main.f", None).series == "w|main.f|"
    assert SeriesKey("w%", "f", None).series == "w%25|f|"


def test_cap_sends_new_series_to_one_overflow_series_and_counts_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = SeriesRegistry(max_series_per_workload=3)
    registry.seed([SeriesKey("a", "f0"), SeriesKey("a", "f1")])
    ids = [registry.resolve(SeriesKey("a", f"f{i}")) for i in range(6)]
    other = registry.resolve(SeriesKey("b", "f9"))
    assert ids[:3] == [0, 1, 2]
    assert ids[3] == ids[4] == ids[5] != other
    assert registry.keys[ids[3]] == SeriesKey("a", OVERFLOW_OPERATION, None)
    assert registry.refused == {"a": 3}
    with caplog.at_level(logging.WARNING):
        registry.resolve(SeriesKey("a", "f7"))
        registry.resolve(SeriesKey("a", "f7"))
    assert registry.refused == {"a": 4}  # distinct series, counted once each
    with pytest.raises(ValueError, match="at least 1"):
        SeriesRegistry(0)


def span(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "span_id": "0" * 32,
        "node": "n1",
        "pid": 10,
        "exe": "/srv/bin/shop",
        "tid": 10,
        "goid": 1,
        "func": "main.handle",
        "start_ns": 0,
        "end_ns": 1,
        "duration_ns": 1,
        "http_method": None,
        "http_path": None,
        "http_status": None,
        "k8s_namespace": None,
        "k8s_pod": None,
        "k8s_container": None,
        "k8s_workload": None,
        "bytes_sent": 0,
        "bytes_received": 0,
        "net_sends": 0,
        "net_recvs": 0,
    }
    base.update(fields)
    return base


def test_resolver_builds_series_from_span_fields() -> None:
    http = {"func": "net/http.serverHandler.ServeHTTP", "http_method": "GET"}
    spans = [
        span(),
        span(exe="/other/dir/shop"),  # same file name: same workload
        span(k8s_namespace="prod", k8s_workload="shop-api", k8s_pod="shop-api-1"),
        span(k8s_workload="solo"),
        span(k8s_workload=""),  # empty: the executable
        span(**http, http_path="/api/user/1", http_status=200),
        span(**http, http_path="/api/user/2", http_status=204),
        span(**http, http_path="/api/user/3", http_status=503),
        span(**http, http_path="/api/user/3", http_status=0),
        span(**http, http_path="/api/user/3", http_status=None),
        span(
            func="net/http.serverHandler.ServeHTTP",
            http_method="POST",
            http_path="/api/user/4",
            http_status=201,
        ),
    ]
    values = [codec("span.avsc").encode(s) for s in spans]
    columns = decode_spans(values)
    registry = SeriesRegistry(100)
    ids = SeriesResolver(registry).resolve(columns, np.arange(len(spans))).tolist()
    keys = [registry.keys[i] for i in ids]
    assert keys == [
        SeriesKey("shop", "main.handle"),
        SeriesKey("shop", "main.handle"),
        SeriesKey("prod/shop-api", "main.handle"),
        SeriesKey("solo", "main.handle"),
        SeriesKey("shop", "main.handle"),
        SeriesKey("shop", "GET /api/user/{id}", "2xx"),
        SeriesKey("shop", "GET /api/user/{id}", "2xx"),
        SeriesKey("shop", "GET /api/user/{id}", "5xx"),
        SeriesKey("shop", "GET /api/user/{id}", "unknown"),
        SeriesKey("shop", "GET /api/user/{id}", "unknown"),
        SeriesKey("shop", "POST /api/user/{id}", "2xx"),
    ]
    assert ids[0] == ids[1] == ids[4]
