"""The multimodal model: per-modality encoders, masked fusion, classification head.

Parameters are addressed by name (``encoders.<modality>.*``, ``fusion.*``, ``head.*``) so that
aggregation, per-modality budgets and freezing can select them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmshield.data.dataset import ModalitySpec
from mmshield.models.encoders import build_encoder
from mmshield.models.fusion import AttentionFusion, ConcatFusion


class MultimodalModel(nn.Module):
    """Encoders per modality, a fusion module and a head.

    Parameters
    ----------
    encoders
        ``modality name -> encoder``; each maps ``(B, *shape)`` to ``(B, D)``.
    fusion
        Module taking ``(B, M, D)`` embeddings and a ``(B, M)`` bool mask.
    head
        Module mapping the fused vector to logits.

    Notes
    -----
    An absent input is replaced by zeros *before* its encoder (a selection, so NaN or any
    garbage in the slot cannot reach the output or the gradients), and its embedding is masked
    out by the fusion. A sample's output therefore does not depend on what sits in the slots of
    its absent modalities.
    """

    def __init__(
        self, encoders: Mapping[str, nn.Module], fusion: nn.Module, head: nn.Module
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion = fusion
        self.head = head

    @property
    def modalities(self) -> list[str]:
        """Modality names in the order the fusion sees them."""
        return list(self.encoders.keys())

    def forward(
        self, inputs: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Return logits ``(B, classes)``.

        Parameters
        ----------
        inputs
            ``modality -> (B, *shape)`` tensors.
        present
            ``modality -> (B,)`` bool masks.
        """
        return self.head(self.embed(inputs, present))

    def embed(
        self, inputs: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Return the fused embedding ``(B, D)`` that the head classifies."""
        embeddings = []
        masks = []
        for name, encoder in self.encoders.items():
            x = inputs[name]
            p = present[name]
            shape = (p.shape[0],) + (1,) * (x.dim() - 1)
            x = torch.where(p.view(shape), x, torch.zeros_like(x))
            embeddings.append(encoder(x))
            masks.append(p)
        emb = torch.stack(embeddings, dim=1)
        mask = torch.stack(masks, dim=1)
        fused: torch.Tensor = self.fusion(emb, mask)
        return fused


def modality_of_parameter(name: str) -> str | None:
    """Return the modality an ``encoders.<modality>.*`` parameter belongs to, else ``None``."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "encoders":
        return parts[1]
    return None


def build_model(
    specs: list[ModalitySpec],
    num_classes: int,
    *,
    embed_dim: int = 64,
    fusion: str = "attention",
    fusion_hidden: int = 64,
    seed: int = 0,
) -> MultimodalModel:
    """Build the default model for the given modalities.

    Parameters
    ----------
    specs
        Modality specs of the data set (order is kept).
    num_classes
        Output size.
    embed_dim
        Embedding size of every encoder.
    fusion
        ``"attention"`` or ``"concat"``.
    fusion_hidden
        Hidden layer after fusion (0 for none). A single tabular modality with
        ``fusion="concat"`` and ``fusion_hidden=0`` is a plain ``D-embed_dim-classes`` MLP.
    seed
        Seed for parameter initialisation.

    Returns
    -------
    MultimodalModel
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        encoders = {s.name: build_encoder(s, embed_dim) for s in specs}
        fuse: nn.Module
        if fusion == "attention":
            fuse = AttentionFusion(len(specs), embed_dim, fusion_hidden)
        elif fusion == "concat":
            fuse = ConcatFusion(len(specs), embed_dim, fusion_hidden)
        else:
            raise ValueError(f"unknown fusion {fusion!r}; use 'attention' or 'concat'")
        head = nn.Linear(int(fuse.out_dim), num_classes)  # type: ignore[arg-type]
        return MultimodalModel(encoders, fuse, head)
    finally:
        torch.random.set_rng_state(generator_state)
