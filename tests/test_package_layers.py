"""The package's layers hold, and the checks that hold them can fail.

- `make lint` runs import-linter with the contracts in pyproject.toml: the agent and the
  consumers never import each other, only the agent's loaders import BCC, aiokafka only
  behind the Kafka edge and each side's one Kafka module. Here the contracts run on a copy
  of the package, first as it is (kept), then with a consumer importing the agent and the
  agent importing a consumer (broken, naming the import).
- The CLI imports only the chosen subcommand's module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGE_FOLDERS = ("ebpf_apm", "producer", "consumers", "schemas", "bpf")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    for folder in PACKAGE_FOLDERS:  # ebpf_apm/ links to the others, as in the checkout
        shutil.copytree(REPO / folder, tmp_path / folder, symlinks=True)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def inject(module: Path, line: str) -> None:
    module.write_text(module.read_text() + f"\n{line}  # injected by the test\n")


def test_the_contracts_hold_and_break_when_a_layer_is_crossed(package_copy: Path) -> None:
    kept = lint_imports(package_copy)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "0 broken" in kept.stdout
    inject(package_copy / "consumers" / "span_joiner.py", "import ebpf_apm.producer.targets")
    inject(package_copy / "producer" / "span_batcher.py", "import ebpf_apm.consumers.byte_hash")
    inject(package_copy / "consumers" / "window_aggregator.py", "import bcc")
    broken = lint_imports(package_copy)
    assert broken.returncode == 1, broken.stdout
    out = broken.stdout
    assert "The agent and the consumers never import each other BROKEN" in out
    assert "ebpf_apm.consumers.span_joiner -> ebpf_apm.producer.targets" in out
    assert "ebpf_apm.producer.span_batcher -> ebpf_apm.consumers.byte_hash" in out
    assert "Only the BPF compile helper imports BCC BROKEN" in out
    assert "ebpf_apm.consumers.window_aggregator -> bcc" in out


HEAVY = ("capstone", "elftools", "aiohttp", "bcc", "asyncpg", "aiosqlite", "yaml")


def modules_loaded_by(argv: list[str]) -> set[str]:
    """Top-level modules a CLI invocation imports (run in a fresh interpreter)."""
    script = (
        "import sys\nfrom ebpf_apm import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return set(result.stdout.split())


@pytest.mark.parametrize(
    "argv, absent",
    [
        (["--help"], HEAVY + ("aiokafka", "numpy", "fastavro")),
        (["tail", "--help"], HEAVY),
        (["query", "--help"], ("capstone", "elftools", "aiohttp", "bcc", "aiokafka")),
        (["dashboard", "--help"], ("capstone", "elftools", "aiohttp", "bcc", "aiokafka")),
        (["join", "--help"], HEAVY),
        (["export", "--help"], ("capstone", "elftools", "bcc", "asyncpg", "aiosqlite", "yaml")),
    ],
)
def test_the_cli_imports_only_the_chosen_subcommand(argv: list[str], absent: tuple) -> None:
    loaded = modules_loaded_by(argv)
    assert "ebpf_apm" in loaded
    assert not loaded & set(absent), sorted(loaded & set(absent))
