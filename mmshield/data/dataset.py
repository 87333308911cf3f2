"""Multimodal data sets and batches with a per-sample presence mask for every modality.

A missing modality is a first-class state: ``present[name][i]`` is ``False`` and whatever sits
in ``inputs[name][i]`` must never influence anything (models mask it out before their encoders).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from mmshield.errors import DataError

ModalityKind = Literal["image", "audio", "text", "tabular"]


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality's tensors look like once featurised.

    Parameters
    ----------
    name
        Modality name, used in parameter names (``encoders.<name>.*``).
    kind
        ``image`` (float ``(C, H, W)`` in [0, 1]), ``audio`` (float log-mel ``(1, mels, frames)``),
        ``text`` (int64 hashed n-gram ids ``(L,)``, 0 is padding) or ``tabular`` (float ``(D,)``).
    shape
        Per-sample tensor shape.
    vocab_size
        Number of hash buckets for ``text`` (ids are in ``[1, vocab_size)``); 0 otherwise.
    """

    name: str
    kind: ModalityKind
    shape: tuple[int, ...]
    vocab_size: int = 0


@dataclass
class MultimodalDataset:
    """An in-memory multimodal data set.

    Parameters
    ----------
    specs
        One :class:`ModalitySpec` per modality, in a fixed order.
    inputs
        ``name -> tensor`` of shape ``(N, *spec.shape)``.
    present
        ``name -> bool tensor (N,)``; ``False`` marks the modality absent for that sample.
    labels
        ``int64 tensor (N,)`` with values in ``[0, len(classes))``.
    classes
        Class names, indexed by label.
    ids
        Optional record ids (for error messages and provenance).
    """

    specs: list[ModalitySpec]
    inputs: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    labels: torch.Tensor
    classes: list[str]
    ids: list[str] | None = None
    name: str = "dataset"
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.labels.shape[0])
        for spec in self.specs:
            x = self.inputs.get(spec.name)
            p = self.present.get(spec.name)
            if x is None or p is None:
                raise DataError(f"{self.name}: modality {spec.name!r} has no inputs or mask")
            if tuple(x.shape) != (n, *spec.shape):
                raise DataError(
                    f"{self.name}: modality {spec.name!r} has shape {tuple(x.shape)}, "
                    f"expected {(n, *spec.shape)}"
                )
            if p.dtype != torch.bool or tuple(p.shape) != (n,):
                raise DataError(f"{self.name}: presence mask of {spec.name!r} must be bool ({n},)")
        if self.ids is not None and len(self.ids) != n:
            raise DataError(f"{self.name}: {len(self.ids)} ids for {n} records")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def modalities(self) -> list[str]:
        """Modality names in spec order."""
        return [s.name for s in self.specs]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def spec(self, name: str) -> ModalitySpec:
        """Return the spec of modality ``name``."""
        for s in self.specs:
            if s.name == name:
                return s
        raise KeyError(name)

    def subset(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> MultimodalDataset:
        """Return the records at ``index`` (a copy); per-record ``meta`` entries (sequences with
        one item per record) are indexed too."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        n, rows = len(self), idx.tolist()
        meta: dict[str, object] = {}
        for key, value in self.meta.items():
            if isinstance(value, torch.Tensor | np.ndarray) and len(value) == n:
                meta[key] = value[idx] if isinstance(value, torch.Tensor) else value[rows]
            elif isinstance(value, list | tuple) and len(value) == n:
                meta[key] = [value[i] for i in rows]
            else:
                meta[key] = value
        return MultimodalDataset(
            specs=list(self.specs),
            inputs={k: v[idx] for k, v in self.inputs.items()},
            present={k: v[idx] for k, v in self.present.items()},
            labels=self.labels[idx],
            classes=list(self.classes),
            ids=[self.ids[i] for i in idx.tolist()] if self.ids is not None else None,
            name=self.name,
            meta=meta,
        )

    def with_presence(self, present: dict[str, torch.Tensor]) -> MultimodalDataset:
        """Return a shallow copy whose presence masks are replaced by ``present``."""
        return MultimodalDataset(
            specs=list(self.specs),
            inputs=self.inputs,
            present={k: present.get(k, v) for k, v in self.present.items()},
            labels=self.labels,
            classes=list(self.classes),
            ids=self.ids,
            name=self.name,
            meta=dict(self.meta),
        )


@dataclass
class FederatedDataset:
    """A training set split across clients, plus a held-out test set.

    Parameters
    ----------
    train
        All training records of all clients.
    client_indices
        One int64 array per client: the rows of ``train`` that client holds.
    test
        Held-out test records (all modalities as in the source data).
    """

    train: MultimodalDataset
    client_indices: list[np.ndarray]
    test: MultimodalDataset

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.client_indices)

    def client(self, k: int) -> MultimodalDataset:
        """Return client ``k``'s local data set."""
        return self.train.subset(self.client_indices[k])
