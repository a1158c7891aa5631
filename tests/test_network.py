import numpy as np
import pytest

from fedcomp.config import compose_config
from fedcomp.network import ClientLink, NetworkModel


def test_round_time_formula():
    link = ClientLink(uplink_bps=8e6, downlink_bps=16e6, latency_s=0.01, speed_factor=2.0)
    # 1 MB up at 8 Mbit/s = 1 s; 2 MB down at 16 Mbit/s = 1 s; compute 0.5 s x 2; 2 x latency
    assert link.round_time(1_000_000, 2_000_000, 0.5) == pytest.approx(1 + 1 + 1 + 0.02)


def test_round_is_as_slow_as_its_slowest_client():
    net = NetworkModel((ClientLink(1e6, 1e6, 0), ClientLink(1e5, 1e6, 0)))
    assert net.round_time({0: (1000, 0, 0.0), 1: (1000, 0, 0.0)}) == pytest.approx(0.08)


def test_mobile_4g_preset_and_lognormal_spread():
    cfg = compose_config(["network=mobile_4g"])
    assert cfg.network.uplink_mbps == 9.75 and cfg.network.downlink_mbps == 33.88
    net = NetworkModel.from_config(cfg.network, 4000, seed=0)
    up = np.array([link.uplink_bps for link in net.links])
    assert up.mean() == pytest.approx(9.75e6, rel=0.05)
    assert up.std() > 0.3 * up.mean()


def test_per_client_csv(tmp_path):
    path = tmp_path / "links.csv"
    path.write_text("client,uplink_mbps,downlink_mbps,latency_ms,speed_factor\n1,5,50,100,3\n")
    cfg = compose_config(["network=wan_100mbps", "network.heterogeneity.kind=csv", f"network.heterogeneity.path={path}"])
    net = NetworkModel.from_config(cfg.network, 3, seed=0)
    assert net.links[0] == ClientLink(100e6, 100e6, 0.02, 1.0)
    assert net.links[1] == ClientLink(5e6, 50e6, 0.1, 3.0)
