import json

import numpy as np
import pytest

from fedcomp.allocation import dagc_ratios
from fedcomp.allocation.controllers import DAGC, Accordion, AdapTopK, Explicit, History, Uniform, adaptopk_ratio
from fedcomp.compression import build


def test_uniform_explicit_and_dagc_controllers():
    h = History(weights=np.array([0.5, 0.3, 0.15, 0.05]))
    assert Uniform(0.01).ratios(1, [0, 2], h) == {0: 0.01, 2: 0.01}
    assert Explicit([0.1, 0.2, 0.3, 0.4]).ratios(1, [3, 1], h) == {3: 0.4, 1: 0.2}
    d = dagc_ratios(h.weights, 0.01, "paper")
    assert DAGC(0.01).ratios(7, [0, 3], h) == {0: d[0], 3: d[3]}


def test_adaptopk_schedule_keeps_the_fixed_topk_budget():
    T, k = 100, 0.01
    r = [adaptopk_ratio(t, k, 0.5, 40, T) for t in range(1, T + 1)]
    assert r[0] == pytest.approx(0.015) and r[20] == pytest.approx(0.005) and r[-1] == pytest.approx(0.015)
    assert sum(r) == pytest.approx(k * T)  # same total as fixed top-k
    assert sum(1 for x in r if x < k) == T // 2  # the (1 - gamma) window is T/2 long
    assert AdapTopK(0.01, 0.5, T).t_hat == 50


def test_accordion_switches_on_norm_change():
    acc = Accordion(low=0.001, high=0.01, eta=0.5, interval=2)
    h = History(weights=np.ones(2))
    assert acc.ratios(1, [0], h) == {0: 0.01}  # critical at the start
    h.update_norms = [1.0, 1.0, 1.0, 1.0]
    assert acc.ratios(5, [0], h) == {0: 0.001}  # no change: compress hard
    h.update_norms += [0.2, 0.2]
    assert acc.ratios(7, [0], h) == {0: 0.01}  # big change: critical again


def test_set_ratio_reaches_the_sparsifier_and_is_refused_by_dense_compressors():
    import torch

    c = build("topk", ratio=0.5, error_feedback=True, scope="layerwise", sizes=[50, 50])
    c.set_ratio(0.1)
    assert int((c.decompress(c.compress(torch.randn(100))) != 0).sum()) == 10
    with pytest.raises(ValueError, match="no sparsification ratio"):
        build("qsgd").set_ratio(0.1)


@pytest.mark.parametrize("extra", [("compressor=topk",), ("strategy=hgc",)])
def test_dagc_controller_end_to_end_records_per_client_ratios(fast_cfg, tmp_path, extra):
    from fedcomp.fl.engine import run_inline

    cfg = fast_cfg("partition=volume_skew", "partition.skew_ratio=20", "controller=dagc", "controller.mean_ratio=0.05", *extra)
    run_inline(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    weights = np.array(json.loads((tmp_path / "partition.json").read_text())["weights"])
    expected = dagc_ratios(weights, 0.05, "paper")
    for row in rows:
        got = {int(c): v["ratio"] for c, v in row["clients"].items()}
        if extra == ("compressor=topk",):
            assert got == pytest.approx({c: expected[c] for c in got})
            # bigger ratio, more bytes: the budget shows up in the payloads
            order = sorted(got, key=got.get)
            assert row["clients"][str(order[0])]["bytes_up"] < row["clients"][str(order[-1])]["bytes_up"]
        else:  # HGC's shared mask takes the mean ratio
            assert len(set(got.values())) == 1 and list(got.values())[0] == pytest.approx(expected.mean(), rel=0.01)
