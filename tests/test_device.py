"""train.device: training, evaluation and compression (selection, error feedback) on an
accelerator; only the chosen indices and values move to the CPU to be coded, and payloads are
the CPU path's, byte for byte.

The CUDA tests run where torch sees a GPU (the project's GPU machine) and are skipped elsewhere.
"""

import pytest
import torch

from fedcomp.compression import build
from fedcomp.config import ConfigError
from fedcomp.fl.engine import run_inline
from fedcomp.fl.runtime import resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_device_values_are_checked_when_composing(fast_cfg):
    with pytest.raises(ConfigError, match="train.device"):
        fast_cfg("train.device=gpu")
    if torch.cuda.device_count() > 1:
        assert fast_cfg("train.device=cuda:1").train.device == "cuda:1"
    else:  # asked for a device this machine lacks: refused when composing, before any data loads
        with pytest.raises(ConfigError, match="^train.device:"):
            fast_cfg("train.device=cuda:1")


def test_auto_falls_back_to_cpu_and_missing_cuda_is_a_config_error():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        with pytest.raises(ConfigError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


@cuda
@pytest.mark.parametrize("overrides", [
    ["compressor=topk", "compressor.up.ratio=0.1"],
    ["strategy=hgc", "strategy.ratio=0.1"],
])
def test_cuda_training_matches_cpu_up_to_float_noise(fast_cfg, tmp_path, overrides):
    cpu = run_inline(fast_cfg("num_rounds=3", *overrides), tmp_path / "cpu")
    gpu = run_inline(fast_cfg("num_rounds=3", "train.device=cuda", *overrides), tmp_path / "gpu")
    assert gpu["final_accuracy"] == pytest.approx(cpu["final_accuracy"], abs=0.02)
    # same coder, same selection on (nearly) the same update: the byte counts agree closely
    assert gpu["total_bytes_up"] == pytest.approx(cpu["total_bytes_up"], rel=0.02)


NAMES = ["topk", "randomk", "threshold", "stochastic", "terngrad", "qsgd", "signsgd", "scaled_sign", "stc", "sq", "dgc",
         "adaptive_threshold", "cat"]


@cuda
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("error_feedback", [False, True], ids=["", "ef"])
def test_compressors_work_on_cuda_tensors_and_give_the_cpu_payload(name, error_feedback):
    """Three rounds, with each round's state stored on the CPU between rounds (as a client's
    store does): every payload equals the CPU path's, and the state stays on the device."""
    sizes = [6_000, 4_000]
    a, b = (build(name, error_feedback=error_feedback, scope="layerwise", sizes=sizes) for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    for rnd in range(3):
        x = torch.randn(10_000, generator=gen)
        for c in (a, b):
            c.reseed(rnd)
            c.set_round(rnd + 1)
        on_cpu, on_gpu = a.compress(x), b.compress_donated(x.cuda())  # donated, as a client does
        assert on_cpu == on_gpu
        assert torch.equal(b.decompress(on_gpu), a.decompress(on_cpu))
        b.load_state({k: v.cpu() for k, v in b.state().items()})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_the_uplink_compressor_sees_the_update_on_the_training_device(fast_cfg, monkeypatch, tmp_path, device):
    from fedcomp.fl import client_app
    from fedcomp.fl.engine import run_experiment

    seen = []
    loaded = client_app.uplink_compressor

    def spied(*args):  # the round's compressor, as the client's round gets it, whatever its class
        up = loaded(*args)
        compress = type(up).compress_donated.__get__(up)  # the class's, not a spy left by an earlier round
        monkeypatch.setattr(up, "compress_donated", lambda x: seen.append(x.device.type) or compress(x))
        return up

    monkeypatch.setattr(client_app, "uplink_compressor", spied)
    run_experiment(fast_cfg(f"train.device={device}", "compressor=topk", "compressor.up.error_feedback=true"), tmp_path)
    assert seen and set(seen) == {device}


@cuda
@pytest.mark.parametrize("bits", [1, 3])
def test_hgc_uplink_on_cuda_gives_the_cpu_payload(bits):
    """HGC's error feedback, the owner's top-k and the residual on the device: an owner round,
    then member rounds on its mask, with the predictor fed between rounds, give the CPU path's
    payloads, masks and memory bit for bit; the memory stays on the device."""
    from fedcomp.fl.hgc_client import encode_update
    from fedcomp.hgc.settings import HGCSettings

    settings = HGCSettings(bits=bits, scope="layerwise")
    segments = settings.segments([6_000, 4_000])
    predictor = settings.predictor()
    gen = torch.Generator().manual_seed(0)
    memory, shared = {"cpu": None, "cuda": None}, None
    for _ in range(3):
        update = torch.randn(10_000, generator=gen)
        (payload, mask, held), (on_gpu, gpu_mask, gpu_held) = (
            encode_update(update.clone().to(device), memory[device], shared, 0.01, settings, segments, predictor) for device in ("cpu", "cuda"))
        assert on_gpu == payload and torch.equal(gpu_mask, mask) and gpu_mask.device.type == "cpu"
        assert gpu_held.device.type == "cuda" and torch.equal(gpu_held.cpu(), held)
        memory, shared = {"cpu": held, "cuda": gpu_held.cpu()}, mask
        g = torch.zeros(10_000, dtype=torch.float64)
        g[mask] = torch.randn(len(mask), generator=gen, dtype=torch.float64)
        predictor.observe(g, mask)
