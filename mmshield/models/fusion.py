"""Fusion of per-modality embeddings with absent modalities masked out.

Both fusions take ``(B, M, D)`` embeddings and a ``(B, M)`` bool presence mask. Absent embeddings
never reach the output: concatenation zeroes them with ``torch.where`` (a selection, so even NaN
garbage cannot leak) and attention gives them zero weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConcatFusion(nn.Module):
    """Concatenate masked embeddings, optionally followed by a hidden layer.

    Parameters
    ----------
    num_modalities
        ``M``.
    embed_dim
        ``D``.
    hidden
        Size of a Linear+ReLU layer after concatenation; 0 for none (output is ``M * D``).
    """

    def __init__(self, num_modalities: int, embed_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.layer = nn.Linear(num_modalities * embed_dim, hidden) if hidden > 0 else None
        self.out_dim = hidden if hidden > 0 else num_modalities * embed_dim

    def forward(self, emb: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Fuse ``(B, M, D)`` embeddings under a ``(B, M)`` mask into ``(B, out_dim)``."""
        masked = torch.where(present.unsqueeze(-1), emb, torch.zeros_like(emb))
        out = masked.flatten(1)
        if self.layer is not None:
            out = F.relu(self.layer(out))
        return out


class AttentionFusion(nn.Module):
    """A learned query attends over the present modalities' tokens (masked softmax).

    Each token is the modality's embedding plus a learned modality embedding. Absent modalities
    get a score of -inf, so their weight is exactly 0.

    Parameters
    ----------
    num_modalities
        ``M``.
    embed_dim
        ``D``.
    hidden
        Size of a Linear+ReLU layer after pooling; 0 for none (output is ``D``).
    """

    def __init__(self, num_modalities: int, embed_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.modality_embedding = nn.Parameter(torch.zeros(num_modalities, embed_dim))
        self.query = nn.Parameter(torch.randn(embed_dim) / embed_dim**0.5)
        self.key = nn.Linear(embed_dim, embed_dim)
        self.value = nn.Linear(embed_dim, embed_dim)
        self.layer = nn.Linear(embed_dim, hidden) if hidden > 0 else None
        self.out_dim = hidden if hidden > 0 else embed_dim

    def forward(self, emb: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Fuse ``(B, M, D)`` embeddings under a ``(B, M)`` mask into ``(B, out_dim)``."""
        safe = torch.where(present.unsqueeze(-1), emb, torch.zeros_like(emb))
        tokens = safe + self.modality_embedding
        scores = (self.key(tokens) @ self.query) / tokens.shape[-1] ** 0.5  # (B, M)
        scores = torch.where(present, scores, torch.full_like(scores, float("-inf")))
        # A sample with no modality at all would give NaN; its weights become 0 instead.
        any_present = present.any(-1, keepdim=True)
        scores = torch.where(any_present, scores, torch.zeros_like(scores))
        weights = torch.softmax(scores, dim=-1) * any_present
        out = (weights.unsqueeze(-1) * self.value(tokens)).sum(1)
        if self.layer is not None:
            out = F.relu(self.layer(out))
        return out
