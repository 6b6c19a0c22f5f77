"""Size and speed of the sparse index codings in `threepc.common.bitpack`.

For each d and density k/d it prints, per kind of index set, the coding `encode_indices`
chose, its exact bit length, the information limit log2 C(d, k), the ratios of the chosen and of
the fixed-width (ceil(log2 d) bits per index) encodings to that limit, and the median encode and
decode times. Two reference rows give the cost of what a TopK round does anyway:
`argpartition` (selecting k of d float32 values) and `memcpy` (`x.copy()` of the d float32 input).

    .venv/bin/python benchmarks/bench_index_coding.py
    .venv/bin/python benchmarks/bench_index_coding.py --d 1e7 --density 0.01 --all-codings

Prints figures only; it never fails on timing. At k >~ 1e6 the times on a small VM are dominated
by first touches of freshly allocated pages (numpy temporaries are tens of MB); running with
MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000 keeps glibc's heap warm and
shows the compute cost alone (about 2x lower there, unchanged at k = 1e5).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from threepc.common.bitpack import (
    IndexCoding,
    decode_indices,
    encode_indices,
    encode_indices_as,
    log2_binomial,
)

HEADER = (
    f"{'kind':<13} {'d':>9} {'k/d':>7} {'coding':<12} {'bits':>10} {'limit bits':>11} "
    f"{'bits/limit':>10} {'fixed/limit':>11} {'encode ms':>9} {'decode ms':>9}"
)


def _median_ms(repeats: int, fn: Callable[..., object], *args: object) -> float:
    """Median wall time of fn(*args) in ms, after one warm-up call (caches, allocator)."""
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _index_sets(rng: np.random.Generator, d: int, k: int) -> dict[str, np.ndarray]:
    """uniform: a random k-subset; topk: TopK of a heavy-tailed vector (as uniform, but produced
    the way a worker produces it); clustered: runs of consecutive coordinates (layer-structured
    gradients), where gaps are far from geometric."""
    uniform = np.sort(rng.choice(d, size=k, replace=False))
    g = rng.standard_t(3, size=d).astype(np.float32)
    topk = np.sort(np.argpartition(np.abs(g), d - k)[d - k :])
    run = max(1, k // 50)
    starts = np.sort(rng.choice(d // run, size=k // run, replace=False)) * run
    clustered = np.unique((starts[:, None] + np.arange(run)).ravel())[:k]
    return {"uniform": uniform, "topk": topk, "clustered": clustered}


def _row(
    kind: str, d: int, k: int, coding: str, bits: int | None, enc: float, dec: float | None
) -> str:
    limit = log2_binomial(d, k)
    fixed = k * (d - 1).bit_length()

    def ratio(b: int) -> str:
        return f"{b / limit:.4f}" if limit > 0 else ("1.0000" if b == 0 else "inf")

    if bits is None:
        sizes = f"{'-':>10} {'-':>11} {'-':>10} {'-':>11}"
    else:
        sizes = f"{bits:>10} {limit:>11.0f} {ratio(bits):>10} {ratio(fixed):>11}"
    dec_s = f"{'-':>9}" if dec is None else f"{dec:>9.2f}"
    return f"{kind:<13} {d:>9.0e} {k / d:>7.2%} {coding:<12} {sizes} {enc:>9.2f} {dec_s}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="threepc bench index-coding", description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--density", type=float, nargs="+", default=[0.0001, 0.001, 0.01, 0.1, 0.3])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--all-codings", action="store_true", help="also time each coding forced")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    print(HEADER)
    print("-" * len(HEADER))
    for d in map(int, args.d):
        x32 = rng.standard_normal(d).astype(np.float32)
        for density in args.density:
            k = max(1, round(d * density))
            for kind, idx in _index_sets(rng, d, k).items():
                coding, data, bits = encode_indices(idx, d)
                assert np.array_equal(decode_indices(coding, data, idx.size, d), idx)
                enc = _median_ms(args.repeats, encode_indices, idx, d)
                dec = _median_ms(args.repeats, decode_indices, coding, data, idx.size, d)
                print(_row(kind, d, idx.size, coding.name, bits, enc, dec))
                if args.all_codings and kind == "uniform":
                    for c in IndexCoding:
                        cdata, cbits = encode_indices_as(c, idx, d)
                        enc = _median_ms(args.repeats, encode_indices_as, c, idx, d)
                        dec = _median_ms(args.repeats, decode_indices, c, cdata, idx.size, d)
                        print(_row("  forced", d, idx.size, c.name, cbits, enc, dec))
            select = _median_ms(args.repeats, np.argpartition, np.abs(x32), d - k)
            print(_row("argpartition", d, k, "-", None, select, None))
            print(_row("memcpy", d, k, "-", None, _median_ms(args.repeats, x32.copy), None))
        print()


if __name__ == "__main__":
    main()
