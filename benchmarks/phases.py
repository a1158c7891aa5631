"""Where a round's time goes, phase by phase, for one cell of ``scale.py``'s table.

The cell runs in this process with timers around the round's pieces: the server's
``configure_train``, ``receive`` (each reply's checks and decoding) and ``aggregate``; the
client's ``receive_model``, ``uplink_compressor`` (its state loaded), ``compress``, the gradient
norm and ``reply``; and the training (``local_training`` per client inline, ``train_cohort`` per
cohort batched). HGC's client round is its own: ``synchronise`` (the relay: the replica, the
predictor and the velocity brought to the server's version), ``encode_update`` (its compress) and
``reply``; its ``configure_train`` includes the mask owner's exchange, whose timed pieces count
under their own names. "Flower and the rest" is the round minus all of these: Messages, Contexts,
the state store, the engines' turns. Per phase: ms per round (median over rounds 2..R-1) and, on a GPU, the implicit
device synchronisations a round (``torch.cuda.set_sync_debug_mode``). On a GPU each timed call is
bracketed by ``torch.cuda.synchronize``, so that device work is charged to the phase that queued
it (the synchronisations cost a little time of their own).

    python benchmarks/phases.py [--model mlp] [--method fedavg] [--engine batched] [--rounds 6] [--device cuda] [--out FILE]

Prints a table and writes benchmarks/results/phases.json (or FILE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections import defaultdict
from pathlib import Path

# isort: off
import fedcomp  # noqa: F401 -- before torch, so that fedcomp's OpenMP spin limit holds here as in a run
# isort: on
import torch
from scale import METHODS, _in_process, overrides

RESULTS = Path(__file__).parent / "results" / "phases.json"


class Phases:
    """Seconds and implicit device synchronisations per (round, phase). A phase's time excludes
    the timed phases it calls (HGC's ``configure_train`` runs the mask owner's whole round)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.round = 0
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.syncs: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.caught: list = []
        self._inner: list[list[float]] = []  # per open timed call: [seconds, syncs] of the timed calls inside it

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            if self.cuda:
                torch.cuda.synchronize()
            before, start = len(self.caught), time.perf_counter()
            self._inner.append([0.0, 0])
            try:
                return fn(*args, **kwargs)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                seconds, syncs = time.perf_counter() - start, len(self.caught) - before
                inner_s, inner_syncs = self._inner.pop()
                self.seconds[self.round][name] += seconds - inner_s
                self.syncs[self.round][name] += syncs - inner_syncs
                if self._inner:
                    self._inner[-1][0] += seconds
                    self._inner[-1][1] += syncs
        return wrapper

    def wrap(self, owner, attr: str, name: str) -> None:
        setattr(owner, attr, self.timed(name, getattr(owner, attr)))


def install(phases: Phases, engine: str, method: str) -> None:
    from fedcomp.fl import batched, client_app, client_round, hgc_client
    from fedcomp.fl.hgc_strategy import HGCStrategy
    from fedcomp.fl.strategy import CompressedFedAvg

    strategy = HGCStrategy if method == "hgc" else CompressedFedAvg
    configure = strategy.configure_train

    def configure_train(self, server_round, *args, **kwargs):
        phases.round = server_round
        return configure(self, server_round, *args, **kwargs)

    strategy.configure_train = configure_train
    for owner, attr in ((strategy, "configure_train"), (CompressedFedAvg, "receive"), (strategy, "aggregate")):
        phases.wrap(owner, attr, f"server {attr}")
    phases.wrap(client_round, "mean_gradient_sq_norm", "client gradient norm")
    if method == "hgc":  # its own client round (fedcomp.fl.hgc_client): the relay, then the uplink
        phases.wrap(hgc_client, "synchronise", "client synchronise (relay)")
        phases.wrap(hgc_client, "encode_update", "client compress")
        phases.wrap(hgc_client, "reply", "client reply")
    else:
        for attr in ("receive_model", "reply"):
            phases.wrap(client_app, attr, f"client {attr}")
        loaded = client_app.uplink_compressor

        def uplink_compressor(*args):
            up = phases.timed("client uplink_compressor", loaded)(*args)
            up.compress_donated = phases.timed("client compress", type(up).compress_donated.__get__(up))
            return up

        client_app.uplink_compressor = uplink_compressor
    if engine == "batched":  # local_training parks the client's turn there: time the cohort's training instead
        phases.wrap(batched, "train_cohort", "training (cohort)")
    else:
        phases.wrap(client_round, "local_training", "training (per client)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--method", default="fedavg", choices=list(METHODS))
    ap.add_argument("--engine", default="batched", choices=["inline", "batched"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    assert args.rounds >= 3, "need rounds 2..R-1"
    from fedcomp.config import compose_config
    from fedcomp.fl.runtime import resolve_device

    cfg = compose_config(overrides(args.model, args.method, args.engine, args.rounds, device=args.device))
    phases = Phases(resolve_device(args.device))
    install(phases, args.engine, args.method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        phases.caught = caught
        if phases.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        result = _in_process(cfg, args.engine)
        if phases.cuda:
            torch.cuda.set_sync_debug_mode("default")
    measured = range(2, args.rounds)  # round 1 warms up, the last evaluates
    names = sorted({name for r in measured for name in phases.seconds[r]})
    rounds = [result["rounds_s"][r - 1] for r in measured]
    rows = {name: statistics.median(phases.seconds[r][name] for r in measured) for name in names}
    rows["Flower and the rest"] = statistics.median(
        rounds[i] - sum(phases.seconds[r].values()) for i, r in enumerate(measured))
    syncs = {name: statistics.median(phases.syncs[r][name] for r in measured) for name in names}
    round_s = statistics.median(rounds)
    print(f"{args.model} {args.method} {args.engine} on {args.device}: {round_s * 1e3:.1f} ms a round (median of rounds 2-{args.rounds - 1})")
    for name, s in sorted(rows.items(), key=lambda kv: -kv[1]):
        sync = f" {syncs[name]:6.0f} syncs" if phases.cuda and name in syncs else ""
        print(f"  {name:<28} {s * 1e3:8.1f} ms {100 * s / round_s:5.1f}%{sync}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "method": args.method, "engine": args.engine, "device": args.device,
                                    "gpu": torch.cuda.get_device_name() if phases.cuda else None, "round_s": round_s,
                                    "phases_s": rows, "syncs": syncs if phases.cuda else None}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
