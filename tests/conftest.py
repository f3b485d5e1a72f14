"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from go_builds import TARGETS_DIR, Toolchain, build_c, build_go

# --- Built test targets (tests/targets, built by tests/go_builds.py) -------------------
# Session-scoped: each binary is built (or copied from the build cache) once per run.

GO_TARGET_VARIANTS: list[tuple[Toolchain, bool]] = [
    ("1.27", False),
    ("1.27", True),
    ("1.19", False),
    ("1.19", True),
]


@pytest.fixture(scope="session")
def go_targets(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    """tests/targets/goserver built by each toolchain, unstripped and stripped (-s -w).

    Keys are (toolchain, stripped), e.g. ("1.19", True).
    """
    out = tmp_path_factory.mktemp("goserver")
    return {
        (toolchain, stripped): build_go(
            TARGETS_DIR / "goserver",
            out / f"goserver-go{toolchain}{'-stripped' if stripped else ''}",
            toolchain,
            stripped,
        )
        for toolchain, stripped in GO_TARGET_VARIANTS
    }


@pytest.fixture(scope="session")
def c_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/targets/ccalls/main.c built with gcc -O2 -g."""
    out = tmp_path_factory.mktemp("ccalls")
    return build_c(TARGETS_DIR / "ccalls" / "main.c", out / "ccalls")


# --- End of built test targets ---------------------------------------------------------


# --- Kafka (tests/kafka_fixtures.py): one real broker per session ----------------------
from kafka_fixtures import fresh_kafka_broker, kafka_broker  # noqa: E402, F401

# --- PostgreSQL (tests/postgres_fixture.py): a real server per session -----------------
from postgres_fixture import postgres_server, postgres_url  # noqa: E402, F401
