"""Datasets held in memory as tensors (train and test splits)."""

from fedcomp.data.datasets import DatasetMissingError, TensorData, load_dataset

__all__ = ["DatasetMissingError", "TensorData", "load_dataset"]
