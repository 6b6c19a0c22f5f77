import pytest

from threepc.common import config
from threepc.common.errors import ConfigError


def test_defaults_run_and_components_take_both_forms() -> None:
    a = config.parse({"compressor": "top_k"})
    b = config.parse({"compressor": {"name": "top_k", "k": 5}})
    assert a.compressor.name == b.compressor.name == "top_k"
    assert b.compressor.params == {"k": 5}
    assert config.parse({}).method.name == "ef21"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"wrokers": 3}, "wrokers: unknown field"),
        ({"workers": 0}, "workers:"),
        ({"data": {"split": "random"}}, "data.split:"),
        ({"wire": {"value_dtype": "int8"}}, "wire.value_dtype:"),
        ({"stepsize": -1.0}, "stepsize"),
    ],
)
def test_bad_fields_are_named(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config.parse(data, "run.toml")


def test_json_round_trip_is_exact() -> None:
    c = config.parse({"compressor": {"name": "top_k", "k": 5}, "stepsize": 0.5})
    assert config.from_json(config.to_json(c)) == c


def test_unknown_compressor_parameter_is_refused() -> None:
    from threepc.common.methods import build_method

    c = config.parse({"compressor": {"name": "top_k", "kk": 5}})
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_method(c, 10)


def test_the_message_limit_fits_a_workers_largest_message() -> None:
    """A worker's float64 gradient (diagnostics) is 8 d bytes: at d = 1e7 over the 64 MiB default."""
    from threepc.common.engine import message_limit

    assert message_limit(config.parse({}), 1000) == 64 << 20
    assert message_limit(config.parse({}), 10**7) >= 9 * 10**7
    assert message_limit(config.parse({"wire": {"max_message_bytes": 1 << 20}}), 1000) == 1 << 20
    with pytest.raises(ConfigError, match=r"wire.max_message_bytes = 1048576 is below .* d = 1000000"):
        message_limit(config.parse({"wire": {"max_message_bytes": 1 << 20}}), 10**6)


def test_chunks_are_4_mib_unless_set_and_every_chunk_frame_fits_the_message_limit() -> None:
    """Unset, a float32 iterate at d = 1e6 travels whole, larger messages in 4 MiB chunks; every
    chunk's frame (data and its Chunk envelope) fits the limit the coordinator enforces."""
    from threepc.common.engine import chunk_bytes, message_limit
    from threepc.common.wire import frames
    from threepc.proto.threepc_pb2 import WorkerMessage

    unset = config.parse({})
    for d in (1000, 10**7):
        assert chunk_bytes(unset, d) == 4 << 20 < message_limit(unset, d)
    assert chunk_bytes(unset, 10**6) > 4 * 10**6 + 64  # a d = 1e6 float32 iterate and its fields
    small = config.parse({"wire": {"max_message_bytes": 1 << 16}})
    big = WorkerMessage(chunk={"data": bytes(300_000)})  # any message over the limit
    pieces = frames(big, chunk_bytes(small, 1000))
    assert len(pieces) == 5 and max(len(p) for p in pieces) <= 1 << 16
    assert chunk_bytes(config.parse({"wire": {"chunk_bytes": 4096}}), 10**7) == 4096
    with pytest.raises(ConfigError, match=r"wire.chunk_bytes = 65536 does not fit .* 65536 bytes"):
        chunk_bytes(config.parse({"wire": {"max_message_bytes": 1 << 16, "chunk_bytes": 1 << 16}}), 1000)


def test_a_config_that_is_not_utf8_is_one_clear_error(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_bytes(b"workers = 2\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run.toml: not UTF-8 text \(byte 0xe9 at offset 17\)"):
        config.load(path)


def test_data_fallback_is_an_error_unless_a_stand_in_is_asked_for_by_name() -> None:
    assert config.parse({}).data.fallback == "error"
    assert config.parse({"data": {"fallback": "synthetic"}}).data.fallback == "synthetic"
    with pytest.raises(ConfigError, match="data.fallback:"):
        config.parse({"data": {"fallback": "zeros"}})


@pytest.mark.parametrize(
    "params, message",
    [
        ({"k": 2.5}, "compressor 'top_k': k must be an integer, got 2.5"),
        ({"k": True}, "compressor 'top_k': k must be an integer, got True"),
        ({"k": "3"}, "compressor 'top_k': k must be an integer, got '3'"),
    ],
)
def test_component_parameters_of_the_wrong_type_are_named(params: dict, message: str) -> None:
    from threepc.common.methods import build_method

    c = config.parse({"compressor": {"name": "top_k", **params}})
    with pytest.raises(ConfigError, match=message):
        build_method(c, 10)


def test_check_types_takes_an_int_for_a_float_and_leaves_other_types_alone() -> None:
    def factory(k: int, p: float, name: str | None = None, table: dict | None = None) -> None: ...

    config.check_types(factory, {"k": 3, "p": 1, "name": None, "table": "anything"}, "it")
    with pytest.raises(ConfigError, match="it: p must be a number, got True"):
        config.check_types(factory, {"p": True}, "it")
    with pytest.raises(ConfigError, match="it: name must be str, got 3"):
        config.check_types(factory, {"name": 3}, "it")
