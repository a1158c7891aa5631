import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcomp.metrics.accounting import compression_ratios, speedup


def rows(*rounds):
    return [{"clients": {str(i): {"bytes_up": u, "bytes_down": d} for i, (u, d) in enumerate(r)}} for r in rounds]


def test_max_and_total_compression_ratios():
    cr = compression_ratios(rows([(10, 100), (20, 100)], [(5, 50), (40, 200)]), dense_bytes=1000)
    assert cr["max_cr"]["up"] == 200 and cr["max_cr"]["down"] == 20
    assert cr["max_cr"]["total"] == pytest.approx(2000 / 55)
    assert cr["total_cr"]["up"] == pytest.approx(4000 / 75)
    assert cr["total_cr"]["down"] == pytest.approx(4000 / 450)
    assert cr["total_cr"]["total"] == pytest.approx(8000 / 525)


def test_fedavg_is_one_and_speedup():
    cr = compression_ratios(rows([(1000, 1000)] * 3), dense_bytes=1000)
    assert cr["max_cr"] == cr["total_cr"] == {"up": 1.0, "down": 1.0, "total": 1.0}
    assert speedup(10.0, 2.5) == 4.0


def test_summary_reports_ratios(fast_cfg, tmp_path):
    from fedcomp.fl.engine import run_inline

    none = run_inline(fast_cfg(), tmp_path / "none")
    assert none["total_cr"]["up"] == pytest.approx(1.0) and none["max_cr"]["down"] == pytest.approx(1.0)
    topk = run_inline(fast_cfg("compressor=topk"), tmp_path / "topk")
    assert topk["max_cr"]["up"] > 20 and topk["total_cr"]["down"] == pytest.approx(1.0)


# Record values Flower serialises: scalars and lists of one type (ints span sint64 and uint64;
# a list holds one of them).
_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_SCALARS = st.one_of(st.booleans(), _INTS, st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=300))
_LISTS = st.one_of(st.lists(st.booleans(), max_size=5), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
                   st.lists(st.integers(0, 2**64 - 1), max_size=5), st.lists(st.floats(allow_nan=False), max_size=5),
                   st.lists(st.text(max_size=8), max_size=5), st.lists(st.binary(max_size=40), max_size=5))
_CONFIG = st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(_SCALARS, _LISTS), max_size=5)
_METRIC = st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(_INTS.filter(lambda v: v < 2**63), st.floats(allow_nan=False),
                                                                      st.lists(st.floats(allow_nan=False), max_size=4)), max_size=5)


@settings(max_examples=300, deadline=None)
@given(config=_CONFIG, metrics=_METRIC, twin=st.data())
def test_message_overhead_is_protobufs_size_and_looked_up_by_shape(config, metrics, twin):
    """``overhead_bytes`` gives Flower's serialised size of the content with bytes values left
    empty, and a second content of the same shape (same keys and types, values of the same
    encoded lengths) gets its size without serialising again."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict
    from flwr.common.serde import recorddict_to_proto

    from fedcomp.fl import messages as M

    def content(cfg, met):
        return RecordDict({"c": ConfigRecord(cfg), "m": MetricRecord(met)})

    def protobuf_size(rd):
        stripped = {k: b"" if isinstance(v, bytes) else v for k, v in rd["c"].items()}
        return recorddict_to_proto(RecordDict({"c": ConfigRecord(stripped), "m": rd["m"]})).ByteSize()

    first = content(config, metrics)
    assert M.overhead_bytes(first) == protobuf_size(first)

    # The same shape: every positive int replaced by another of its bit length, every float by
    # another float, every payload by other bytes (they are left empty either way).
    def same_shape(v, top):
        if isinstance(v, bool):
            return twin.draw(st.booleans())
        if isinstance(v, int) and v > 0:  # (a negative int keeps its value)
            return twin.draw(st.integers(min_value=1 << (v.bit_length() - 1), max_value=(1 << v.bit_length()) - 1))
        if isinstance(v, float):
            return twin.draw(st.floats(allow_nan=False))
        if isinstance(v, bytes) and top:
            return twin.draw(st.binary(max_size=300))
        if isinstance(v, list):
            return [same_shape(e, False) for e in v]
        return v

    second = content({k: same_shape(v, True) for k, v in config.items()}, {k: same_shape(v, False) for k, v in metrics.items()})
    calls = []
    real = M.recorddict_to_proto
    M.recorddict_to_proto = lambda rd: calls.append(rd) or real(rd)
    try:
        assert M.overhead_bytes(second) == protobuf_size(second)
    finally:
        M.recorddict_to_proto = real
    assert not calls
