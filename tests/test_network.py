"""The simulated clock: profiles, availability, compute and codec models, round policies."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedcomp.config import compose_config
from fedcomp.fl.rounds import RoundPolicy
from fedcomp.network import Availability, ClientProfile, ClientWork, Profiles, SystemModel, TraceError
from fedcomp.network.codec_time import CodecCost, CodecTimes
from fedcomp.network.compute import training_flops_per_sample

TABLE = CodecTimes(50e9, {"identity": CodecCost(0.001, 1e-9, 0.0), "topk": CodecCost(0.0, 2e-9, 1e-8)},
                   {"identity": CodecCost(0.0, 1e-9, 0.0), "topk": CodecCost(0.0, 1e-9, 0.0)})


def one_client(profile: ClientProfile, **kw) -> SystemModel:
    return SystemModel(Profiles([[(0.0, profile)]]), Availability(1, 0), d=1000, flops_per_sample=1e6, codec_times=TABLE, **kw)


def test_timeline_formula():
    p = ClientProfile(uplink_bps=8e6, downlink_bps=16e6, latency_s=0.01, flops=1e9)
    system = one_client(p)
    work = ClientWork(0, down_bytes=2_000_000, down_codec="identity", up_bytes=1_000_000, up_codec="topk", samples=500)
    t = system.timeline(work, 10.0)
    down = 0.01 + 1.0 + 1e-9 * 1000 * 50e9 / 1e9  # latency + 2 MB at 16 Mbit/s + identity decode scaled to 1 GFLOP/s
    assert t.downloaded == pytest.approx(10.0 + down)
    assert t.trained - t.downloaded == pytest.approx(1e6 * 500 / 1e9)  # FLOPs / device speed
    encode = (2e-9 * 1000 + 1e-8 * 1_000_000) * 50  # topk encode, scaled from 50 to 1 GFLOP/s
    assert t.uploaded - t.trained == pytest.approx(encode + 0.01 + 1.0)
    assert one_client(p, codec="none").timeline(work, 0).uploaded == pytest.approx(0.01 + 1 + 0.5 + 0.01 + 1)


def test_measured_modes_read_the_clients_reports():
    p = ClientProfile(1e9, 1e9, 0.0, 1e9)
    work = ClientWork(0, 0, "identity", 0, "topk", samples=10, measured_compute_s=3.0, measured_encode_s=0.5, measured_decode_s=0.25)
    t = one_client(p, compute="measured", codec="measured").timeline(work, 0)
    assert (t.downloaded, t.trained, t.uploaded) == pytest.approx((0.25, 3.25, 3.75))


def test_shared_mask_members_wait_for_the_relayed_mask():
    p = ClientProfile(8e6, 8e6, 0.0, 1e12)
    system = one_client(p, codec="none")
    work = ClientWork(0, down_bytes=1000 + 100, down_codec="hgc.relay", up_bytes=0, up_codec="hgc", samples=0)
    t = system.timeline(work, 0.0, mask_ready=5.0, mask_bytes=100)
    assert t.downloaded == pytest.approx(1e-3) and t.uploaded == pytest.approx(5.0 + 100 * 8 / 8e6)


def test_server_decodes_arrivals_one_at_a_time():
    system = one_client(ClientProfile(1e9, 1e9, 0, 1e9))
    per = 1e-9 * 1000 * 50e9 / 50e9  # topk decode at the server's 50 GFLOP/s
    assert system.server_done([(1.0, "topk", 10), (1.0, "topk", 10), (5.0, "topk", 10)], 0.0) == pytest.approx(5.0 + per)
    assert system.server_done([], 2.0) == 2.0


def test_codec_times_scale_with_device_speed_and_fall_back_to_identity(caplog):
    assert TABLE.seconds("topk", "encode", 1000, 100, 25e9) == pytest.approx(2 * TABLE.seconds("topk", "encode", 1000, 100, 50e9))
    assert TABLE.seconds("layerwise.topk", "decode", 1000, 5, 50e9) == TABLE.seconds("topk", "decode", 1000, 5, 50e9)
    with caplog.at_level(logging.WARNING, logger="fedcomp"):
        assert TABLE.seconds("mycodec", "encode", 1000, 1, 50e9) == TABLE.seconds("identity", "encode", 1000, 1, 50e9)
    assert "mycodec" in caplog.text


def test_the_shipped_table_covers_every_registered_compressor_and_hgc():
    from fedcomp.compression import registered
    from fedcomp.network import shipped_codec_times

    table = shipped_codec_times()
    names = set(registered()) - {"topk_bidirectional"} | {"hgc", "hgc.relay", "hgc.paper", "hgc.sync"}
    assert names <= set(table.encode) and names <= set(table.decode) and table.reference_flops > 1e9


def test_training_flops_are_counted_once_per_model():
    from omegaconf import OmegaConf

    from fedcomp.models import build_model

    mlp = build_model(OmegaConf.create({"name": "mlp", "hidden": [16]}), (1, 12, 12), 10, 0)
    # forward 2 x (144 x 16 + 16 x 10) MACs, backward twice that (input grads of the first layer are not needed)
    flops = training_flops_per_sample(mlp, (1, 12, 12), 10)
    assert flops == pytest.approx(2 * (144 * 16 + 16 * 10) * 3 - 2 * 144 * 16, rel=0.01)
    assert all(p.grad is None for p in mlp.parameters())  # counted on a copy


@pytest.mark.parametrize("name", ["cnn4", "vgg11s"])
def test_flop_count_equals_torch_flop_counter(name):
    """The counter (which spares start-up the torch._dynamo import) counts what PyTorch's
    FlopCounterMode counts, batch-norm and pooling included."""
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from fedcomp.models import build_model

    model = build_model(OmegaConf.create({"name": name}), (1, 28, 28), 10, 0)
    x, y = torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert training_flops_per_sample(model, (1, 28, 28), 10) == counter.get_total_flops() / 8


def test_presets_cite_their_numbers_and_spread_lognormally():
    cfg = compose_config(["network=mobile_4g"])
    assert (cfg.network.downlink_mbps, cfg.network.uplink_mbps, cfg.network.latency_ms) == (35.96, 11.22, 40)
    profiles = Profiles.from_config(cfg.network, 4000, seed=0)
    up = np.array([profiles.at(c).uplink_bps for c in range(4000)])
    speed = np.array([profiles.at(c).flops for c in range(4000)])
    assert up.mean() == pytest.approx(11.22e6, rel=0.05) and up.std() > 0.3 * up.mean()
    assert speed.mean() == pytest.approx(10e9, rel=0.05) and speed.std() > 0.3 * speed.mean()
    again = Profiles.from_config(cfg.network, 4000, seed=0)
    assert all(again.at(c) == profiles.at(c) for c in range(0, 4000, 97))


def test_csv_trace_static_and_time_varying(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("client,from_s,uplink_mbps,downlink_mbps,latency_ms,gflops\n1,0,5,50,100,2\n1,60,1,,,\n")
    cfg = compose_config(["network=wan_100mbps", "network.heterogeneity.kind=csv", f"network.heterogeneity.path={path}"])
    profiles = Profiles.from_config(cfg.network, 3, seed=0)
    assert profiles.at(0) == ClientProfile(100e6, 100e6, 0.02, 50e9)
    assert profiles.at(1, 10.0) == ClientProfile(5e6, 50e6, 0.1, 2e9)
    assert profiles.at(1, 60.0) == ClientProfile(1e6, 100e6, 0.02, 50e9)  # the later row, preset elsewhere
    bad = tmp_path / "bad.csv"
    bad.write_text("client,uplink_mbps\n7,5\n")
    with pytest.raises(TraceError, match="client 7"):
        Profiles.from_config(compose_config(["network.heterogeneity.kind=csv", f"network.heterogeneity.path={bad}"]).network, 3, 0)


def test_availability_trace_and_reproducible_dropout(tmp_path):
    path = tmp_path / "on.csv"
    path.write_text("client,from_s,to_s\n0,0,10\n0,20,30\n")
    cfg = compose_config([f"network.availability.trace={path}", "network.availability.dropout=0.5"])
    av = Availability.from_config(cfg.network.availability, 2, seed=3)
    assert [av.online(0, t) for t in (0, 9.9, 10, 25, 30)] == [True, True, False, True, False]
    assert av.online(1, 1e9) and av.next_online(10) == 20
    draws = [av.drops(1, r) for r in range(400)]
    assert draws == [Availability.from_config(cfg.network.availability, 2, seed=3).drops(1, r) for r in range(400)]
    assert 0.4 < np.mean(draws) < 0.6


@pytest.mark.parametrize("kind, expect", [("sync", ([1, 2, 3], [])), ("deadline", ([1, 2], [3])), ("overcommit", ([1, 2], [3]))])
def test_round_policies_select(kind, expect):
    policy = RoundPolicy(kind, deadline_s=2.5, overcommit=1.5)
    chosen = policy.select([(3.0, "c"), (1.0, "a"), (2.0, "b")], 2, 0.0)
    assert [t for t, _ in chosen.accepted] == expect[0] and [t for t, _ in chosen.late] == expect[1]
    assert policy.cohort(2, 10) == (3 if kind == "overcommit" else 2)
    assert RoundPolicy.staleness_weight(3) == 0.5


def run_cli(tmp_path, *args):
    proc = subprocess.run([sys.executable, "-m", "fedcomp", "dataset=synthetic", "model=mlp", "model.hidden=[16]", "simulation.num_clients=4",
                           "num_rounds=3", "train.steps=3", "progress=false", f"hydra.run.dir={tmp_path}", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((tmp_path / "summary.json").read_text())


def test_simulated_time_is_the_same_under_machine_load(tmp_path):
    """network.compute=flops and the codec table: the host's load changes nothing."""
    quiet = run_cli(tmp_path / "quiet", "network=mobile_4g", "compressor=qsgd")
    burner = subprocess.Popen([sys.executable, "-c", "import torch\nwhile True: torch.randn(512, 512) @ torch.randn(512, 512)"])
    try:
        loaded = run_cli(tmp_path / "loaded", "network=mobile_4g", "compressor=qsgd")
    finally:
        burner.kill()
    assert quiet["sim_time_s"] == loaded["sim_time_s"] > 0
    assert quiet["wall_time_s"] != loaded["wall_time_s"]


POLICIES = [
    ["strategy.round=sync"],
    ["strategy.round=deadline", "strategy.deadline_s=0.000001"],
    ["strategy.round=overcommit", "simulation.fraction=0.5"],
    ["strategy.round=async", "strategy.buffer_size=2", "strategy.concurrency=3"],
]


def compressor_configs():
    from fedcomp.config.compose import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "compressor").glob("*.yaml"))


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p[0].split("=")[1])
@pytest.mark.parametrize("compressor", [*compressor_configs(), "hgc"])
def test_every_round_policy_runs_with_every_compressor(fast_cfg, tmp_path, policy, compressor):
    from fedcomp.fl.engine import run_inline

    if compressor == "hgc" and "strategy.round=async" in policy:
        with pytest.raises(ValueError, match="synchronous"):
            run_inline(fast_cfg("strategy=hgc", policy[0], "num_rounds=3"), tmp_path)
        return
    chosen = ["strategy=hgc", "strategy.ratio=0.05"] if compressor == "hgc" else [f"compressor={compressor}"]
    summary = run_inline(fast_cfg(*chosen, *policy, "num_rounds=3", "network.availability.dropout=0.2"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and summary["sim_time_s"] > 0
    assert summary["total_bytes_up"] + summary["total_bytes_down"] == sum(r["bytes_up"] + r["bytes_down"] for r in rows)
    for r in rows:  # a round either aggregated someone or was skipped, and says which
        assert (r["num_clients"] > 0) != r["skipped"]
    if "deadline" in policy[0]:  # a 1 us deadline, below any link latency: everyone misses it, every round is skipped, traffic still counted
        assert all(r["skipped"] and r["bytes_up"] > 0 for r in rows)
