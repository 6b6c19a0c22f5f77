"""The checked-in generated code matches threepc.proto."""

from threepc.proto.generate import stale_files


def test_generated_code_is_fresh() -> None:
    assert stale_files() == [], "run: python -m threepc.proto.generate"
