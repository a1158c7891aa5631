"""Untrusted and failing clients: bounded decoding, checked updates, rounds that survive faults."""

import json
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch

from fedcomp.compression import PayloadError, build
from fedcomp.fl import messages as M
from fedcomp.fl.engine import run_inline


def read_rows(path):
    def no_nan(token):
        raise ValueError(f"non-JSON number {token}")

    return [json.loads(line, parse_constant=no_nan) for line in (path / "metrics.jsonl").read_text().splitlines()]


def fault(kind, clients=(1,), rounds=(2,)):
    return f"simulation.faults=[{{kind: {kind}, clients: {list(clients)}, rounds: {list(rounds)}}}]"


@pytest.mark.parametrize("kind, compressor, reason", [
    ("crash", "topk", "client error"),
    ("lose_down", "topk", "no reply"),
    ("lose", "topk", "no reply"),
    ("truncate", "topk", "undecodable"),
    ("wrong_shape", "topk", "shape (1,)"),
    ("nan_update", "none", "NaN"),
    ("nan_metrics", "topk", "non-finite"),
    ("forge_size", "topk", "reports 1000000 samples"),
])
def test_a_faulty_client_costs_its_round_never_the_run(fast_cfg, tmp_path, kind, compressor, reason):
    summary = run_inline(fast_cfg(f"compressor={compressor}", "num_rounds=3", fault(kind)), tmp_path)
    rows = read_rows(tmp_path)
    assert [r["failures"] for r in rows] == [0, 1, 0] and [r["num_clients"] for r in rows] == [4, 3, 4]
    (failed,) = rows[1]["failed"]
    assert failed["partition_id"] == 1 and reason in failed["reason"]
    assert failed["bytes_down"] > 0  # what the server sent it is counted
    assert summary["failures"] == 1 and summary["final_accuracy"] > summary["initial_accuracy"]


def test_corruption_with_the_crc_recomputed_is_caught_by_the_hmac(fast_cfg, tmp_path):
    plain = run_inline(fast_cfg("compressor=topk", "num_rounds=3", fault("corrupt", rounds=(1, 2, 3))), tmp_path / "plain")
    sealed = run_inline(fast_cfg("compressor=topk", "num_rounds=3", "simulation.integrity=hmac", fault("corrupt", rounds=(1, 2, 3))),
                        tmp_path / "sealed")
    assert sealed["failures"] == 3 and all("authentication" in r["failed"][0]["reason"] for r in read_rows(tmp_path / "sealed"))
    assert plain["failures"] <= 3  # without a MAC some corruptions decode to other values; the run goes on either way
    clean = run_inline(fast_cfg("compressor=topk", "num_rounds=3"), tmp_path / "clean")
    sealed_clean = run_inline(fast_cfg("compressor=topk", "num_rounds=3", "simulation.integrity=hmac"), tmp_path / "sc")
    assert sealed_clean["total_bytes_up"] - clean["total_bytes_up"] == 3 * 4 * 32  # one 32-byte tag per payload, counted
    assert sealed_clean["final_accuracy"] == clean["final_accuracy"]


@pytest.mark.parametrize("kind", ["lose", "lose_down"])
def test_a_lost_message_resynchronises_the_client_counted(fast_cfg, tmp_path, kind):
    """downlink: update. A reply lost after the client applied the round's delta leaves the
    server unsure of its version: its next downlink is the full model (counted), never a delta
    to a version it may not hold."""
    run_inline(fast_cfg("compressor=topk_bidirectional", "num_rounds=4", fault(kind)), tmp_path)
    rows = read_rows(tmp_path)
    full = rows[0]["clients"]["0"]["bytes_down"]
    assert rows[2]["clients"]["1"]["bytes_down"] == full  # resynchronised in round 3
    assert all(rows[2]["clients"][c]["bytes_down"] < 0.2 * full for c in ("0", "2", "3"))
    assert rows[3]["clients"]["1"]["bytes_down"] < 0.2 * full  # and in sync again


def test_hgc_replaces_a_failed_mask_owner_within_the_round(fast_cfg, tmp_path):
    """Rotating owners: round 2's owner is partition 1; it crashes, the next sampled client
    owns the mask, the round goes on with three clients and every model stays in sync."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedcomp.fl.client_app import make_client_app
    from fedcomp.fl.client_state import client_state
    from fedcomp.fl.engine import InlineGrid
    from fedcomp.fl.hgc_client import synchronise
    from fedcomp.fl.runtime import get_runtime
    from fedcomp.fl.server_app import build_strategy

    cfg = fast_cfg("strategy=hgc", "strategy.ratio=0.05", "num_rounds=4", fault("crash", rounds=(2, 3)))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    grid = InlineGrid(make_client_app(cfg), 4)
    strategy = build_strategy(cfg, get_runtime(cfg))
    strategy.run(grid, strategy_arrays(cfg), 4)
    assert [len(strategy.rounds[r].clients) for r in (1, 2, 3, 4)] == [4, 3, 3, 4]
    assert [f.partition_id for f in strategy.rounds[2].failures] == [1]
    for node, ctx in grid._contexts.items():
        pred = strategy.settings.predictor()
        pred.load_state(client_state(ctx).get(M.HGC_STATE))
        rec = {M.KIND: M.DELTA, M.PAYLOAD: strategy._pending, M.VERSION: strategy._version, "broadcast": "relay",
               "server-lr": strategy.server_lr, "server-momentum": 0.0}
        w, _ = synchronise(rec, client_state(ctx), pred, strategy.segments)
        assert torch.equal(w, strategy._global) and torch.equal(pred.u, strategy.predictor.u)


def strategy_arrays(cfg):
    from flwr.app import ArrayRecord

    from fedcomp.fl.runtime import get_runtime

    return ArrayRecord(get_runtime(cfg).new_model().state_dict())


def test_too_few_replies_skip_the_round_and_leave_the_model(fast_cfg, tmp_path):
    summary = run_inline(fast_cfg("num_rounds=3", fault("crash", clients=(0, 1, 2)), "strategy.min_replies=2"), tmp_path)
    rows = read_rows(tmp_path)
    assert [r["skipped"] for r in rows] == [False, True, False] and rows[1]["failures"] == 3
    assert summary["skipped_rounds"] == 1 and rows[1]["bytes_down"] > 0
    ratio = run_inline(fast_cfg("num_rounds=3", fault("crash", clients=(0,)), "strategy.max_failure_fraction=0.2"), tmp_path / "f")
    assert ratio["skipped_rounds"] == 1


def test_faults_are_the_same_on_the_ray_engine(fast_cfg, tmp_path):
    from fedcomp.fl.engine import run_experiment

    faults = ("simulation.faults=[{kind: crash, clients: [0], rounds: [2]}, {kind: lose, clients: [1], rounds: [2]},"
              " {kind: corrupt, clients: [2], rounds: [2, 3]}]")
    extra = ("compressor=topk_bidirectional", "num_rounds=3", "simulation.integrity=hmac", faults)
    ray = run_experiment(fast_cfg("simulation.backend=ray", *extra), tmp_path / "ray")
    inline = run_inline(fast_cfg(*extra), tmp_path / "inline")
    for key in ("total_bytes_up", "total_bytes_down", "failures", "sim_time_s"):
        assert ray[key] == inline[key]
    assert ray["final_accuracy"] == pytest.approx(inline["final_accuracy"], abs=1e-6)
    def failures(path):  # an engine words a client's exception its own way
        return [[(f["partition_id"], f["bytes_down"], f["bytes_up"], f["reason"].split(":")[0]) for f in r["failed"]] for r in read_rows(path)]

    assert failures(tmp_path / "ray") == failures(tmp_path / "inline")
    assert "injected fault: client crash" in read_rows(tmp_path / "ray")[1]["failed"][0]["reason"]


# -- bounded decoding ---------------------------------------------------------------------------

D = 50_000


def mutations(payload: bytes, rng: np.random.Generator):
    """Truncations, bit flips and overwrites of length and count fields, each with the CRC
    recomputed, so they reach the decoders."""
    from fedcomp.fl.faults import _recrc

    yield payload[: len(payload) // 2]
    for _ in range(30):
        data = bytearray(payload)
        pos = int(rng.integers(0, len(data) - 4))
        if rng.random() < 0.5:
            data[pos] ^= 1 << int(rng.integers(0, 8))
        else:  # a large little-endian number over whatever field is there
            data[pos : pos + 8] = int(rng.integers(2**20, 2**62)).to_bytes(8, "little")[: len(data) - 4 - pos]
        yield _recrc(bytes(data))


def compressors():
    from hydra.utils import instantiate

    from fedcomp.config import compose_config
    from fedcomp.config.compose import CONF_DIR

    for path in sorted((CONF_DIR / "compressor").glob("*.yaml")):
        cfg = compose_config([f"compressor={path.stem}"])
        for direction in ("up", "down"):
            if cfg.compressor[direction].name != "identity" or path.stem == "none":
                yield f"{path.stem}.{direction}", lambda c=cfg.compressor[direction]: instantiate(c, sizes=[D // 2, D - D // 2])


@pytest.mark.parametrize("name, make", list(compressors()), ids=lambda x: x if isinstance(x, str) else "")
def test_decoding_any_mutation_stays_within_bounded_memory(name, make):
    """Every mutated payload either decodes to a tensor of the expected shape or raises
    PayloadError, and decoding never holds more than a small multiple of (expected output +
    payload) -- traced by tracemalloc (numpy's buffers are traced; torch's are, through numpy)."""
    x = torch.randn(D, generator=torch.Generator().manual_seed(0))
    c = make()
    payload = c.compress(x)
    rng = np.random.default_rng(1)
    for bad in mutations(payload, rng):
        tracemalloc.start()
        try:
            y = c.decompress(bad, (D,), torch.float32)
            assert y.shape == (D,)
        except PayloadError:
            pass
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak <= 16 * (4 * D + len(bad)) + (1 << 20), f"{name}: {peak} bytes traced decoding {len(bad)} bytes"


def test_shape_claims_are_refused_before_allocating():
    """The issue's bombs: a top-k payload claiming a 2^28-value float64 tensor, a tensor of the
    wrong shape, and symbol / index counts beyond what the receiver expects."""
    from fedcomp.coding import decode_indices, decode_symbols, encode_indices, encode_symbols
    from fedcomp.wire import pack_frame

    topk = build("topk", ratio=0.01)
    bomb = pack_frame("topk", torch.float64, (1 << 28,), bytes([1]) + (8).to_bytes(8, "little") + bytes(8) + bytes(4))
    tracemalloc.start()
    with pytest.raises(PayloadError, match="shape"):
        topk.decompress(bomb, (D,), torch.float32)
    with pytest.raises(PayloadError, match="shape"):
        topk.decompress(topk.compress(torch.ones(1)), (D,))  # the broadcast 5.0 of the issue
    stream = encode_symbols(np.zeros(10, np.int64), 513)
    with pytest.raises(PayloadError, match="expected"):
        decode_symbols(stream[:6] + (1 << 25).to_bytes(8, "little") + stream[14:], 513, count=10)
    with pytest.raises(PayloadError):
        decode_indices(encode_indices(np.arange(5), 10)[:2] + (1 << 40).to_bytes(8, "little"), 10)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


def test_decompression_bombs_die_inside_a_memory_and_cpu_limit(tmp_path):
    """The issue's worst cases, decoded in a process limited to 1.5 GB of address space above
    its start and 60 s of CPU: each must be refused (PayloadError), never exhaust either."""
    script = textwrap.dedent('''
        import resource, sys, zlib
        import numpy as np, torch
        from fedcomp.compression import build, PayloadError
        from fedcomp.coding import encode_symbols
        from fedcomp.hgc.codec import Entry, decode_uplink, encode_uplink, entry_values
        from fedcomp.hgc.predictor import Predictor
        from fedcomp.hgc.segments import Segments
        from fedcomp.wire import pack_frame
        limit = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize() + (3 << 29)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
        n, blob = 10, zlib.compress(bytes(1 << 22), 9)  # 4 KB of deflate that inflates to 4 MB

        def qsgd(count):  # a dense QSGD body whose symbol stream (method 2: deflate) claims count
            stream = bytes([1, 2]) + (513).to_bytes(4, "little") + count.to_bytes(8, "little") + blob
            return pack_frame("qsgd", torch.float32, (n,), bytes([0]) + np.float32(1).tobytes() + (256).to_bytes(2, "little") + stream)

        for payload in (qsgd(1 << 25), qsgd(0), qsgd(n)):  # a huge count, zero, and the right count with a bomb body
            try:
                build("qsgd").decompress(payload, (n,), torch.float32)
                sys.exit("decoded a bomb")
            except PayloadError:
                pass
        d = 1000
        entry = Entry(1, np.zeros((1, 2), np.float32), encode_symbols(np.zeros(1 << 22, np.int64), 2), False, None)
        decoded, _ = decode_uplink(encode_uplink(entry, d), d)
        try:
            entry_values(decoded, torch.arange(10), Predictor(), Segments.of([d]))
            sys.exit("decoded an HGC bomb")
        except PayloadError:
            pass
        print("ok")
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_overhead_is_the_serialised_message_minus_its_payloads(fast_cfg, tmp_path):
    from flwr.common.serde import recorddict_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    from fedcomp.fl.client_app import make_client_app
    from fedcomp.fl.engine import InlineGrid
    from fedcomp.fl.server_app import run_server

    class Tap(InlineGrid):
        sizes: list = []

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)
            for m in [*messages, *replies]:
                payloads = sum(len(v) for rec in m.content.config_records.values() for v in rec.values() if isinstance(v, bytes))
                self.sizes.append(recorddict_to_proto(m.content).ByteSize() - payloads)
            return replies

    cfg = fast_cfg("compressor=topk", "num_rounds=2")
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    grid = Tap(make_client_app(cfg), 4)
    summary = run_server(grid, cfg, tmp_path)
    # a payload's length prefixes (one per nesting level of the message) count with the payload
    measured = summary["total_overhead_up"] + summary["total_overhead_down"]
    messages = len([s for s in grid.sizes if s])
    assert 0 < sum(grid.sizes) - measured <= 16 * messages
    assert summary["total_overhead_up"] > 4 * 2 * 100  # metrics records are not free
