"""Shared test helpers: small configs, the CLI as a subprocess, shared/ data when present."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SMALL = """
workers = 3
rounds = 40
seed = 7
method = "ef21"
stepsize_multiplier = 4.0
[compressor]
name = "top_k"
k = 3
[data]
dataset = "synthetic"
rows = 600
dim = 40
"""


@pytest.fixture
def small_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "small.toml", SMALL)


def threepc(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `threepc` CLI as a user would (a new process), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "threepc.server.cli", *args],
        check=False,  # callers assert on the return code and the output
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def read_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def requires_shared_data(name: str) -> Any:
    return pytest.mark.skipif(
        not (SHARED_DATA / f"{name}.bz2").exists(), reason=f"{name}.bz2 not in {SHARED_DATA}"
    )


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Parsed data sets are cached in a directory of this test session, not the user's ~/.cache
    (worker processes the tests start inherit it)."""
    os.environ.setdefault("THREEPC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def figures(rows: list[dict[str, Any]], key: str = "grad_norm_sq") -> list[Any]:
    """A figure of every round, comparable across runs with `==`, bit for bit: both transports
    sum the workers' diagnostics in worker-id order (Aggregator.apply)."""
    return [r[key] for r in rows]


@contextlib.contextmanager
def tiny_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `folder` (skips where mounting is not permitted); always unmounted."""
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                 capture_output=True, check=False)
    except OSError as err:  # no mount(8) at all
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
