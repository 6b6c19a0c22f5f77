"""The allocator settings (threepc.common.memory): on where they can be, off where asked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "from threepc.common.memory import {0}; print({0}())"


def probe(setting: str = "keep_freed_memory", **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "THREEPC_ALLOCATOR"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(setting)], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
@pytest.mark.parametrize("setting", ["keep_freed_memory", "keep_round_buffers"])
def test_set_by_default_and_left_alone_when_asked(setting: str) -> None:
    assert probe(setting) == "True"
    assert probe(setting, THREEPC_ALLOCATOR="glibc") == "False"
    assert probe(setting, MALLOC_ARENA_MAX="2") == "False"  # the user's own malloc settings win
