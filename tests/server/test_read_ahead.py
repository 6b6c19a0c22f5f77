"""wire.read_ahead's default: how many updates the coordinator reads past the next it applies."""

from __future__ import annotations

import pytest

from threepc.common import config as config_mod
from threepc.server.coordinator import read_ahead


@pytest.mark.parametrize(
    ("workers", "d", "value_dtype", "expected"),
    [
        (8, 10**6, "float32", 8),  # 8 x 4 MB in transit: all read as they come
        (32, 10**6, "float32", 4),  # 128 MB would be: 4 past the next one
        (100, 10**4, "float32", 100),
        (8, 10**7, "float32", 1),  # one 40 MB update at a time
        (8, 10**7, "float64", 1),  # 80 MB: still one, never none
        (8, 4 * 10**6, "float32", 4),  # 16 MB updates: 4 fit in 64 MiB
        (8, 6 * 10**6, "float32", 2),
    ],
)
def test_the_default_reads_ahead_what_fits_in_64_mib(workers: int, d: int, value_dtype: str, expected: int) -> None:
    config = config_mod.parse({"workers": workers, "wire": {"value_dtype": value_dtype}})
    assert read_ahead(config, d) == expected


def test_a_set_read_ahead_is_kept() -> None:
    config = config_mod.parse({"workers": 8, "wire": {"read_ahead": 3}})
    assert read_ahead(config, 10**7) == 3
