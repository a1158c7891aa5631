"""Speed and memory at the scale of pfl-research's benchmark, on real FashionMNIST.

1000 clients x 60 samples (IID), 50 sampled per round, batch 10, one local epoch (6 steps),
lr 0.05; models mlp and cnn4; methods FedAvg, top-k 1% with error feedback, HGC (0.1%, 1 bit).
Each engine (inline, pool, batched, batched_pool; ray on request) runs R rounds in a fresh process; its
per-round time is the median over rounds 2..R-1 (round 1 warms up, the last evaluates) and is
reported over the *plain loop*: the same 50 clients' training as a sequential PyTorch loop
with no Flower, no compression, on the same machine and threads. The plain cell also measures
the limits: the loop's training FLOP rate against the machine's sgemm rate, and the batched
engine's vmapped training alone (no Flower, no compression) over the loop. Peak RSS is the cell
process's (pool, batched_pool: plus its largest worker's); state MB/client is the client-state store's bytes
over the clients holding state (fedcomp's in-process engines).

``--cohorts N ...`` measures how the per-client cost grows with the cohort: mlp, every client
training 6 steps of batch 10 every round, N clients, FedAvg and HGC, inline; the cost per
client-round should stay flat (HGC's relay and prediction are computed once per round, not
once per client).

``--clients N`` samples the 50 clients a round from N instead of 1000, each training 6 steps a
round: with N = 200 and 16 rounds most rounds meet clients that return after missing rounds
(with 1000 and 6 rounds nearly every client is new), the steady state of a long run.

``--repeat N`` runs every cell N times, interleaved (plain, then each method and engine, N
times over), and reports the median round time and the median of the ratios over the plain
loop run just before each; on a shared machine single cells move by tens of percent.

``--device cuda`` runs every cell with ``train.device=cuda``: the plain loop, training and
compression on the GPU (pool workers share it); the limits are then the GPU's float32 rate.
``--out FILE`` writes the results there instead of benchmarks/results/scale.json.

``--memory`` adds the 1000-client memory cells (``--memory-only``: just those); ``--update``
keeps the cells of the results file that are not run again. Memory cells: every client
trains every round (fraction 1) for two rounds, cnn4, inline, HGC and top-k + EF as they are,
with bf16 error feedback and with a state memory budget; the issue's target is 8 GB RSS.

    python benchmarks/scale.py [--models mlp cnn4] [--engines inline pool batched batched_pool] [--rounds 6] [--repeat 3] [--memory] [--cohorts 100 300 1000]
                               [--device cuda] [--out FILE]

Prints a table and writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import fedcomp  # noqa: F401 -- before torch, so that fedcomp's OpenMP spin limit holds here as in a run
# isort: on
import torch
from overhead import fedcomp_rounds, plain_loop, sgemm_gflops, timed

RESULTS = Path(__file__).parent / "results" / "scale.json"
MEMORY_CELLS = (  # (method, extra overrides): cnn4, 1000 clients, every client every round
    ("hgc", ()), ("topk1%+ef", ("simulation.state_memory_gb=2",)), ("hgc", ("simulation.ef_dtype=bfloat16",)),
    ("topk1%+ef", ()), ("hgc", ("simulation.state_memory_gb=4",)),
)
COHORT_STEPS = ("train.steps=6",)  # the same work per client whatever the shard size
METHODS = {
    "fedavg": ["compressor=none"],
    "topk1%+ef": ["compressor=topk", "compressor.up.ratio=0.01", "compressor.up.error_feedback=true"],
    "hgc": ["strategy=hgc", "strategy.ratio=0.001", "strategy.bits=1", "strategy.warmup_rounds=0"],
}


def overrides(model: str, method: str, engine: str, rounds: int, fraction: float = 0.05, extra: tuple[str, ...] = (),
              clients: int = 1000, device: str = "cpu") -> list[str]:
    return [
        "dataset=fmnist", f"train.device={device}", "partition=iid", f"model={model}", f"simulation.num_clients={clients}", f"simulation.fraction={fraction}",
        f"num_rounds={rounds}", "train.epochs=1", "train.steps=null", "train.batch_size=10", "train.lr=0.05",
        f"eval_every={10**6}", "progress=false", f"simulation.backend={'inline' if engine == 'plain' else engine}",
        *([] if engine == "plain" else METHODS[method]), *extra,
    ]


def peak_rss_mb() -> tuple[float, float]:
    """This process's and its largest child's peak resident set (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def cell(model: str, method: str, engine: str, rounds: int, fraction: float, extra: tuple[str, ...] = (), clients: int = 1000,
         device: str = "cpu") -> dict:
    """One measurement, in this (fresh) process."""
    from fedcomp.config import compose_config

    cfg = compose_config(overrides(model, method, engine, rounds, fraction, tuple(extra), clients, device))
    out: dict = {"model": model, "method": method, "engine": engine, "clients": clients, "device": device,
                 "threads": torch.get_num_threads(), "extra": list(extra)}
    if engine == "plain":
        per_round = plain_loop(cfg, rounds, per_round=round(fraction * clients))
        out["round_s"] = statistics.median(per_round[1:-1])
        out.update(training_limits(cfg, rounds, round(fraction * clients), out["round_s"]))
    elif engine in ("inline", "batched"):
        out.update(_in_process(cfg, engine))
    else:
        per_round, total = fedcomp_rounds(cfg)
        out["round_s"], out["startup_s"] = statistics.median(per_round[1:-1]), total - sum(per_round)
    out["rss_mb"], out["child_rss_mb"] = peak_rss_mb()
    return out


def training_limits(cfg, rounds: int, per_round: int, plain_round_s: float) -> dict:
    """What bounds the engines' training: the plain loop's FLOP rate against the machine's
    sgemm rate (batching cannot beat the loop by more than their ratio when the loop is
    compute-bound), and the batched engine's vmapped training alone (``train_cohort``, no
    Flower, no compression) over the plain loop, on the same clients and work."""
    from fedcomp.fl.batched import keep_large_allocations, train_cohort
    from fedcomp.fl.cohort import TrainingRequest
    from fedcomp.fl.local import samples_trained
    from fedcomp.fl.runtime import get_runtime

    rt = get_runtime(cfg)
    w = rt.layout.flatten(rt.new_model())
    rng = torch.Generator().manual_seed(cfg.seed)
    t = rt.local_training
    cohorts = [torch.randperm(cfg.simulation.num_clients, generator=rng)[:per_round].tolist() for _ in range(rounds)]
    samples = statistics.mean(sum(samples_trained(len(rt.client_indices(c)), epochs=t["epochs"], steps=t["steps"],
                                                  batch_size=t["batch_size"]) for c in cohort) for cohort in cohorts)
    flops = rt.training_flops * samples
    keep_large_allocations()  # as the batched engine runs (measured after the plain loop, which ran without it)
    kernel = [timed(lambda cohort=cohort, r=r: train_cohort(rt, [TrainingRequest(w, rt.client_indices(c), r * 100003 + c, t, None)
                                                                 for c in cohort]), 1, rt.device)[0]
              for r, cohort in enumerate(cohorts)]
    peak = sgemm_gflops(device=rt.device)
    plain = flops / plain_round_s / 1e9
    return {"training_gflop_per_round": flops / 1e9, "plain_gflops": plain, "sgemm_gflops": peak, "plain_of_sgemm": plain / peak,
            "vmapped_training_s": statistics.median(kernel[1:]), "vmapped_training_over_plain": statistics.median(kernel[1:]) / plain_round_s}


def _in_process(cfg, engine: str) -> dict:
    """Run on a grid built here, so the client-state store can be read afterwards."""
    from fedcomp.fl.batched import BatchedGrid
    from fedcomp.fl.client_app import make_client_app
    from fedcomp.fl.engine import InlineGrid, client_threads, declare_server_task, state_store
    from fedcomp.fl.server_app import run_server

    declare_server_task(1)
    client_threads(cfg.simulation)
    grid = BatchedGrid(cfg) if engine == "batched" else InlineGrid(make_client_app(cfg), cfg.simulation.num_clients, store=state_store(cfg.simulation))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_server(grid, cfg, tmp, False)
        total = time.perf_counter() - start
        wall = [json.loads(line)["wall_time_s"] for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    per_round = [b - a for a, b in zip([0.0] + wall, wall)]
    holders = grid.store.owners
    result = {"round_s": statistics.median(per_round[1:-1]) if len(per_round) > 2 else per_round[-1], "rounds_s": per_round,
              "startup_s": total - sum(per_round),
              "state_mb_per_client": grid.store.state_bytes / max(holders, 1) / 2**20, "clients_with_state": holders,
              "state_gb": grid.store.state_bytes / 2**30}
    grid.close()
    return result


def run_cell(*args) -> dict:
    """``cell`` in a fresh process (clean RSS, no runtime caches shared between cells)."""
    proc = subprocess.run([sys.executable, __file__, "--cell", json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        return {"model": args[0], "method": args[1], "engine": args[2], "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn4"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--engines", nargs="+", default=["inline", "pool", "batched", "batched_pool"],
                    choices=["inline", "pool", "batched", "batched_pool", "ray"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=1, help="run every cell N times, interleaved, and report medians")
    ap.add_argument("--memory", action="store_true", help="also the 1000-client memory cells")
    ap.add_argument("--memory-only", action="store_true", help="only the memory cells (with --update: those not in the results file yet)")
    ap.add_argument("--update", action="store_true", help="keep the results file's other cells, replace the ones run now")
    ap.add_argument("--cohorts", type=int, nargs="*", default=[], metavar="N", help="only: per-client cost at N clients per round (mlp)")
    ap.add_argument("--clients", type=int, default=1000, metavar="N",
                    help="clients in the federation, 50 sampled a round (not 1000: every client trains 6 steps a round, the work of a 60-sample shard)")
    ap.add_argument("--device", default="cpu", help="train.device of every cell (cuda: the plain loop, training and compression on the GPU)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (default benchmarks/results/scale.json)")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(cell(*json.loads(args.cell))))
        return
    assert args.rounds >= 3, "need rounds 2..R-1"
    previous = json.loads(args.out.read_text()) if args.update and args.out.is_file() else {"rows": [], "memory": []}
    rows: dict[tuple, dict] = {(r["model"], r["method"], r["engine"], r.get("clients", 1000), r.get("device", "cpu")): r for r in previous["rows"]}
    # fraction, extra overrides, clients, device
    federation = (50 / args.clients, () if args.clients == 1000 else COHORT_STEPS, args.clients, args.device)
    where = (args.clients, args.device)
    save = functools.partial(write_results, args.out)
    cohorts: dict[tuple, dict] = {(r["method"], r["clients"]): r for r in previous.get("cohorts", [])}
    memory: list[dict] = previous["memory"]  # replaced below only when the memory cells run
    for n in args.cohorts:
        for method in ("fedavg", "hgc"):
            row = run_cell("mlp", method, "inline", args.rounds, 1.0, COHORT_STEPS, n, args.device)
            row["clients"] = n
            cohorts[method, n] = row
            print(f"cohort: mlp {method:>6} {n:5d} clients: {row.get('round_s', float('nan')) / n * 1e3:6.2f} ms per client-round "
                  f"{row.get('error', '')}", flush=True)
            save(rows, memory, args.rounds, cohorts)
    for model in [] if args.memory_only or args.cohorts else args.models:
        runs: dict[tuple, list[dict]] = {}
        for _ in range(args.repeat):  # interleaved, so that a slow spell of a shared machine hits every cell alike
            plain = run_cell(model, "fedavg", "plain", args.rounds, *federation)
            print(_format(plain, plain), flush=True)
            keep(runs, rows, (model, "fedavg", "plain", *where), plain)
            for method in args.methods:
                for engine in args.engines:
                    row = run_cell(model, method, engine, args.rounds, *federation)
                    if "round_s" in row:  # against the plain loop measured just before
                        row["plain_round_s"], row["over_plain"] = plain["round_s"], row["round_s"] / plain["round_s"]
                    keep(runs, rows, (model, method, engine, *where), row)
                    print(_format(row, plain), flush=True)
                    save(rows, memory, args.rounds, cohorts)  # each cell as it is done: a run cut short keeps them
        if args.repeat > 1:
            plain = rows[model, "fedavg", "plain", *where]
            print(f"median of {args.repeat} interleaved repeats:")
            for key in runs:
                print(_format(rows[key], plain), flush=True)
    save(rows, memory, args.rounds, cohorts)
    if args.memory or args.memory_only:
        done = {(r["method"], tuple(r.get("extra", ())), r.get("device", "cpu")): r for r in previous["memory"] if "error" not in r}
        memory = []
        for method, extra in MEMORY_CELLS:
            row = done.get((method, extra, args.device)) or run_cell("cnn4", method, "inline", 2, 1.0, extra, 1000, args.device)
            memory.append(row)
            save(rows, memory, args.rounds, cohorts)  # each cell takes minutes: keep what is done
            print(f"memory: cnn4 {method} {' '.join(extra)} 1000 clients all training: peak RSS {row.get('rss_mb', float('nan')) / 1024:.2f} GB, "
                  f"state {row.get('state_gb', float('nan')):.2f} GB ({row.get('state_mb_per_client', float('nan')):.2f} MB/client) {row.get('error', '')}", flush=True)
    for model in [] if args.memory_only or args.cohorts else args.models:
        p = rows[model, "fedavg", "plain", *where]
        print(f"{model}: plain loop {p['plain_gflops']:.1f} GFLOP/s = {100 * p['plain_of_sgemm']:.0f}% of sgemm ({p['sgemm_gflops']:.1f} GFLOP/s); "
              f"vmapped training alone {p['vmapped_training_over_plain']:.2f}x the plain loop")
    print(f"wrote {args.out}")


def keep(runs: dict[tuple, list[dict]], rows: dict[tuple, dict], key: tuple, row: dict) -> None:
    """Add one repeat of a cell; its row becomes the combination of the repeats so far."""
    runs.setdefault(key, []).append(row)
    rows[key] = combine(runs[key])


def combine(reps: list[dict]) -> dict:
    """One cell from its repeats: the median round time and the median of the per-repeat ratios
    over the plain loop, with every repeat's values kept."""
    ok = [r for r in reps if "round_s" in r]
    if not ok:
        return reps[-1]
    row = dict(ok[-1], repeats=len(ok), round_s_each=[r["round_s"] for r in ok], round_s=statistics.median(r["round_s"] for r in ok))
    if "over_plain" in row:
        row["over_plain_each"] = [r["over_plain"] for r in ok]
        row["over_plain"] = statistics.median(row["over_plain_each"])
    return row


def write_results(path: Path, rows: dict[tuple, dict], memory: list[dict], rounds: int, cohorts: dict[tuple, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "setting": "FashionMNIST, 1000 clients x 60 (IID), 50 per round, batch 10, 1 local epoch, lr 0.05",
        "rounds": rounds, "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rows": list(rows.values()), "memory": memory, "cohorts": list(cohorts.values()),
    }, indent=2))


def _format(row: dict, plain: dict) -> str:
    if "error" in row:
        return f"{row['model']:>5} {row['method']:>10} {row['engine']:>12}  failed: {row['error']}"
    extra = f" | state {row['state_mb_per_client']:.2f} MB/client" if "state_mb_per_client" in row else ""
    over = row.get("over_plain", row["round_s"] / plain["round_s"])
    clients = f" ({row['clients']} clients)" if row.get("clients", 1000) != 1000 else ""
    clients += f" [{row['device']}]" if row.get("device", "cpu") != "cpu" else ""
    return (f"{row['model']:>5} {row['method']:>10} {row['engine']:>12}{clients} {row['round_s'] * 1e3:9.1f} ms/round "
            f"{over:6.2f}x plain | RSS {row['rss_mb']:7.0f} MB (worker {row['child_rss_mb']:5.0f}){extra}")


if __name__ == "__main__":
    main()
