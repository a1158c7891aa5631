import pytest

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
