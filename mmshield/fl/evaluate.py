"""Evaluation of a global model on held-out data, overall and per available-modality subset."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from mmshield.data.dataset import MultimodalDataset
from mmshield.models.model import MultimodalModel


@torch.no_grad()
def evaluate(
    model: MultimodalModel, dataset: MultimodalDataset, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``dataset``.

    Records with no modality present are left out (nothing can be predicted from them).

    Returns
    -------
    loss, accuracy
    """
    model.eval()
    device = next(model.parameters()).device
    any_present = torch.zeros(len(dataset), dtype=torch.bool)
    for m in dataset.modalities:
        any_present |= dataset.present[m].cpu()
    rows = torch.nonzero(any_present).flatten()
    if rows.numel() == 0:
        return float("nan"), float("nan")
    loss_sum, correct = 0.0, 0
    for start in range(0, rows.numel(), batch_size):
        r = rows[start : start + batch_size]
        inputs = {m: dataset.inputs[m][r].to(device) for m in dataset.modalities}
        present = {m: dataset.present[m][r].to(device) for m in dataset.modalities}
        labels = dataset.labels[r].to(device)
        logits = model(inputs, present)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    return loss_sum / rows.numel(), correct / rows.numel()


def modality_subsets(modalities: list[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modalities``, largest first."""
    out: list[tuple[str, ...]] = []
    for r in range(len(modalities), 0, -1):
        out.extend(itertools.combinations(modalities, r))
    return out


def accuracy_by_modalities(
    model: MultimodalModel, dataset: MultimodalDataset, batch_size: int = 1024
) -> dict[str, float]:
    """Accuracy when only a subset of modalities is available, for every subset.

    Keys join modality names with ``+`` (``"image+audio"``). Each subset keeps a record's
    modalities that are both in the subset and present in the record.
    """
    out: dict[str, float] = {}
    for subset in modality_subsets(dataset.modalities):
        present = {m: dataset.present[m] & (m in subset) for m in dataset.modalities}
        _, acc = evaluate(model, dataset.with_presence(present), batch_size)
        out["+".join(subset)] = acc
    return out
