"""Data layer: multimodal records with presence masks, loaders, built-in data sets, partitioners."""

from mmshield.data.dataset import FederatedDataset, ModalitySpec, MultimodalDataset

__all__ = ["FederatedDataset", "ModalitySpec", "MultimodalDataset"]
