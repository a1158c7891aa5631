"""Split a labelled training set over clients: IID, label-Dirichlet, volume skew, shards."""

from fedcomp.partition.partitioners import (
    Partition,
    dirichlet,
    explicit,
    iid,
    make_partition,
    shards,
    volume_skew,
    volume_skew_weights,
)

__all__ = ["Partition", "dirichlet", "explicit", "iid", "make_partition", "shards", "volume_skew", "volume_skew_weights"]
