"""Partitioners: ``labels -> list of per-client index arrays``.

Every partitioner is a pure function of (labels, num_clients, parameters, seed): the same seed
gives the same split on the server and on every client process. Each training sample goes to
exactly one client.

Empty clients: a client with no data cannot train, and a data-weighted average would ignore it
anyway, so every partitioner guarantees each client at least ``min_samples`` samples (default
1). ``dirichlet`` redraws the label proportions (up to ``max_redraws`` times) and, if a draw
still leaves a client short, moves samples to it from the largest client; ``volume_skew`` puts a
floor under its sizes; ``iid`` and ``shards`` are balanced by construction. Asking for more
clients than samples (times ``min_samples``) is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Partition:
    """Per-client sample indices plus the summaries every run saves."""

    indices: list[np.ndarray]
    num_classes: int
    labels: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(ix) for ix in self.indices], dtype=np.int64)

    @property
    def weights(self) -> np.ndarray:
        """Data-volume fractions p_i = n_i / n (the DAGC paper's worker weights)."""
        return self.sizes / self.sizes.sum()

    def label_counts(self) -> np.ndarray:
        """Clients x labels matrix of sample counts."""
        return np.stack([np.bincount(self.labels[ix], minlength=self.num_classes) for ix in self.indices])


def _check(n_samples: int, num_clients: int, min_samples: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if n_samples < num_clients * min_samples:
        raise ValueError(
            f"{n_samples} samples cannot give {num_clients} clients {min_samples} sample(s) each"
        )


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    _check(len(labels), num_clients, 1)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def _fill_short_clients(parts: list[list[int]] | list[np.ndarray], min_samples: int) -> list[np.ndarray]:
    """Move samples from the currently largest client to any client below ``min_samples``."""
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    for i in range(len(parts)):
        while len(parts[i]) < min_samples:
            donor = int(np.argmax([len(p) for p in parts]))
            need = min(min_samples - len(parts[i]), len(parts[donor]) - min_samples)
            parts[i] = np.concatenate([parts[i], parts[donor][-need:]])
            parts[donor] = parts[donor][:-need]
    return parts


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int,
    min_samples: int = 1, max_redraws: int = 100,
) -> list[np.ndarray]:
    """Label skew (Hsu et al. 2019): each class is split over clients by proportions drawn
    from Dirichlet(alpha * 1_n). Small alpha -> each client sees few classes."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _check(len(labels), num_clients, min_samples)
    rng = np.random.default_rng(seed)
    classes = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(max_redraws):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in classes:
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(m) for m in merged) >= min_samples:
            break
    merged = _fill_short_clients(merged, min_samples)
    return [np.sort(m) for m in merged]


SERIES = ("arithmetic", "geometric")


def volume_skew_weights(
    num_clients: int, skew_ratio: float, seed: int, noise_alpha: float = 0.5, series: str = "arithmetic",
) -> np.ndarray:
    """Data-volume fractions p_1 >= ... >= p_n with p_1 / p_n = skew_ratio (DAGC Sec. V-A).

    ``arithmetic`` (the paper's text): an arithmetic series from p_1 down to p_n with
    p_2..p_{n-1} perturbed by Dirichlet(0.5) noise, keeping the order. We draw the n-1 gaps
    between consecutive p_i from Dirichlet(noise_alpha): the expected gaps are equal, the
    series stays descending, and the endpoints, hence SR, are exact.

    ``geometric`` (the authors' code, Jiang-Yutong/DAGC ``get_skew_distribution``): n-1
    log-spaced sizes from SR down to 1, the last repeated (so the two smallest clients share
    p_n), no noise. Under the arithmetic series most clients sit near the middle and SR 100
    and 1000 give nearly the same allocation; log spacing keeps the skew at every scale.
    """
    if skew_ratio < 1:
        raise ValueError(f"skew_ratio must be >= 1, got {skew_ratio}")
    if series not in SERIES:
        raise ValueError(f"series must be one of {SERIES}, got {series!r}")
    if num_clients == 1:
        return np.ones(1)
    if series == "geometric":
        p = np.logspace(np.log10(skew_ratio), 0, num_clients - 1)
        p = np.append(p, p[-1])
        return p / p.sum()
    rng = np.random.default_rng(seed)
    gaps = rng.dirichlet(np.full(num_clients - 1, noise_alpha)) * (skew_ratio - 1.0)
    p = skew_ratio - np.concatenate([[0.0], np.cumsum(gaps)])  # p_n == 1 up to rounding
    p[-1] = 1.0
    return p / p.sum()


def _counts_from_weights(weights: np.ndarray, total: int, min_samples: int) -> np.ndarray:
    """Integer sizes summing to ``total``, proportional to ``weights`` (largest remainder),
    then raised to ``min_samples`` with samples from the largest client."""
    raw = weights * total
    counts = np.floor(raw).astype(np.int64)
    counts[np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]] += 1
    for i in np.flatnonzero(counts < min_samples):
        need = min_samples - counts[i]
        counts[np.argmax(counts)] -= need
        counts[i] += need
    return counts


def volume_skew(
    labels: np.ndarray, num_clients: int, skew_ratio: float, seed: int,
    label_alpha: float | None = None, min_samples: int = 1, series: str = "arithmetic",
) -> list[np.ndarray]:
    """Clients of very different sizes (DAGC's skew-ratio partitions).

    Sizes follow :func:`volume_skew_weights`. Labels are IID within each client, or, with
    ``label_alpha``, each client draws class proportions from Dirichlet(label_alpha) and takes
    what is left of each class (shortfalls filled from the classes that still have samples).
    """
    _check(len(labels), num_clients, min_samples)
    rng = np.random.default_rng(seed)
    sizes = _counts_from_weights(volume_skew_weights(num_clients, skew_ratio, seed, series=series), len(labels), min_samples)
    if label_alpha is None:
        perm = rng.permutation(len(labels))
        return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]
    if label_alpha <= 0:
        raise ValueError(f"label_alpha must be > 0, got {label_alpha}")
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    parts = []
    for size in sizes:
        left = np.array([len(p) for p in pools])
        want = np.minimum(np.floor(rng.dirichlet(np.full(len(pools), label_alpha)) * size).astype(np.int64), left)
        while want.sum() < size:  # top up from classes that still have samples, largest first
            c = int(np.argmax(left - want))
            want[c] += min(size - want.sum(), left[c] - want[c])
        taken = []
        for c, w in enumerate(want):
            taken.extend(pools[c][:w])
            del pools[c][:w]
        parts.append(np.sort(np.asarray(taken, dtype=np.int64)))
    return parts


def explicit(labels: np.ndarray, fractions: list[float], seed: int, min_samples: int = 1) -> list[np.ndarray]:
    """Clients with given data fractions (normalised), IID labels; e.g. DAGC Sec. III's one
    worker with 50% and ten with 5%."""
    w = np.asarray(fractions, dtype=np.float64)
    if w.size == 0 or np.any(w <= 0):
        raise ValueError("fractions must be positive")
    _check(len(labels), len(w), min_samples)
    sizes = _counts_from_weights(w / w.sum(), len(labels), min_samples)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """McMahan et al. 2017 pathological split: sort by label, cut into equal shards, deal
    ``shards_per_client`` random shards to each client (leftover samples go to the last shard)."""
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    _check(len(labels), num_clients * shards_per_client, 1)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * shards_per_client)
    deal = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in deal]


def make_partition(cfg, labels: np.ndarray, num_classes: int, num_clients: int, seed: int) -> Partition:
    """Build the partition a ``partition`` config group entry describes."""
    name = cfg.name
    if name == "iid":
        parts = iid(labels, num_clients, seed)
    elif name == "dirichlet":
        parts = dirichlet(labels, num_clients, cfg.alpha, seed, min_samples=cfg.min_samples)
    elif name == "volume_skew":
        parts = volume_skew(labels, num_clients, cfg.skew_ratio, seed, cfg.label_alpha, cfg.min_samples, cfg.get("series", "arithmetic"))
    elif name == "shards":
        parts = shards(labels, num_clients, cfg.shards_per_client, seed)
    elif name == "explicit":
        if len(cfg.fractions) != num_clients:
            raise ValueError(f"partition.fractions has {len(cfg.fractions)} entries for {num_clients} clients")
        parts = explicit(labels, list(cfg.fractions), seed, cfg.min_samples)
    else:
        raise ValueError(f"unknown partition {name!r}")
    return Partition(parts, num_classes, np.asarray(labels))
