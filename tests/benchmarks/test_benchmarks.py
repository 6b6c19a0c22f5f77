"""The benchmarks run and print well-formed figures (smoke tests: tiny sizes, no timing asserts)."""

import json

import pytest

from tests.conftest import threepc


def test_bench_wire_rows_are_complete_and_topk_is_near_the_limit() -> None:
    r = threepc("bench", "wire", "--d", "1e4", "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    kinds = {row["kind"] for row in rows}
    assert {"dense float32", "top_k 1.0%", "rand_k 1.0%", "qsgd", "skip"} <= kinds
    for row in (row for row in rows if row["kind"] != "memcpy"):
        assert {"kind", "d", "k", "payload_bits", "wire_bytes", "limit_bits", "encode_s", "decode_s"} <= set(row)
        if row["limit_bits"] and row["kind"].startswith("top_k"):
            assert row["payload_bits"] <= 1.05 * row["limit_bits"]


@pytest.mark.e2e
def test_bench_rounds_prints_a_row_with_every_field() -> None:
    r = threepc(
        "bench", "rounds", "--n", "2", "--d", "1e3", "--method", "ef21", "--rounds", "6", "--warmup", "2",
        "--repeats", "1", "--json", timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows, r.stdout
    keys = {"n", "d", "method", "downlink", "rounds_per_s", "raw_rounds_per_s", "inprocess_rounds_per_s",
            "bytes_up", "bytes_down", "coordinator_rss_mb", "worker_rss_mb"}
    assert keys <= set(rows[0])
    assert rows[0]["n"] == 2 and rows[0]["bytes_up"] > 0 and rows[0]["rounds_per_s"] > 0
    row = rows[0]
    # The ideal round is the in-process work over the cores plus the raw round: faster than either alone.
    assert row["ideal_rounds_per_s"] < min(row["raw_rounds_per_s"], 2 * row["inprocess_rounds_per_s"])
    assert 0 < row["worker_base_rss_mb"] < row["worker_rss_mb"]


@pytest.mark.parametrize("which, option", [("rounds", "--downlink"), ("wire", "--d"), ("index-coding", "--density")])
def test_help_after_which_is_the_benchmarks_own(which: str, option: str) -> None:
    r = threepc("bench", which, "--help")
    assert r.returncode == 0, r.stderr
    assert f"usage: threepc bench {which}" in r.stdout and option in r.stdout


def test_bench_without_which_lists_the_benchmarks_and_fails() -> None:
    r = threepc("bench")
    assert r.returncode == 2 and "index-coding" in r.stdout
