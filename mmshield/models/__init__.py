"""Models: per-modality encoders, masked fusion, classification head."""

from mmshield.models.model import MultimodalModel, build_model, modality_of_parameter

__all__ = ["MultimodalModel", "build_model", "modality_of_parameter"]
