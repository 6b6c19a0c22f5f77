"""PermK with more workers than coordinates (n > d), over real gRPC on loopback.

Each worker then sends one coordinate, shared by ~n/d workers (`payloads.perm_k_block`); the
coordinator used to refuse every such update (it took at most d blocks), so the run never got
past round 0. It now equals the in-process run bit for bit, rows and iterate.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.e2e.test_faults import make_plan, on_loopback, worker
from threepc.common.engine import run_in_process
from threepc.worker.client import run_worker

pytestmark = pytest.mark.e2e

CONFIG = (
    'workers = 5\nrounds = 12\nseed = 4\nmethod = "marina"\ncompressor = "perm_k"\nround_timeout_s = 30\n'
    '[data]\ndataset = "synthetic"\nrows = 200\ndim = 3\n'
)


def test_perm_k_with_more_workers_than_coordinates_runs_as_in_process() -> None:
    the_plan = make_plan(CONFIG)
    assert the_plan.config.workers > the_plan.dim

    async def main() -> tuple[list[dict], np.ndarray]:
        async with on_loopback(the_plan) as (c, address):
            run = asyncio.ensure_future(c.run())
            workers = [run_worker(worker(address, i, reconnect_timeout_s=5.0)) for i in range(5)]
            await asyncio.wait_for(asyncio.gather(run, *workers), 180)
            return c.rows, c.agg.x

    rows, x = asyncio.run(main())
    local = run_in_process(the_plan)
    assert len(rows) == len(local.rows) == 12
    assert sum(r["refused"] for r in rows) == 0 and all(r["absent_workers"] == [] for r in rows)
    assert [r["grad_norm_sq"] for r in rows] == [r["grad_norm_sq"] for r in local.rows]
    assert [r["bits_up_per_worker"] for r in rows] == [r["bits_up_per_worker"] for r in local.rows]
    assert x.tobytes() == local.x.tobytes()
