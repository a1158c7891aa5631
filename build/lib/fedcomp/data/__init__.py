"""Datasets held in memory as tensors (train and test splits)."""

from fedcomp.data.datasets import DatasetMissingError, DatasetSpec, TensorData, dataset_spec, load_dataset

__all__ = ["DatasetMissingError", "DatasetSpec", "TensorData", "dataset_spec", "load_dataset"]
