"""Models: iterU-Net, its per-phase U-Net baseline, and the blocks they share."""

from dcesynth.model.blocks import (
    PAPER_FEATURES,
    SPATIAL_MULTIPLE,
    ConvLSTMCell3D,
    LSTMState,
    SinusoidalTimeEncoding,
    TimeEmbedding,
    UNet3D,
)
from dcesynth.model.iterunet import MODEL_NAMES, BaselineUNet, IterUNet, PhaseModel, build_model

__all__ = [
    "MODEL_NAMES",
    "PAPER_FEATURES",
    "SPATIAL_MULTIPLE",
    "BaselineUNet",
    "ConvLSTMCell3D",
    "IterUNet",
    "LSTMState",
    "PhaseModel",
    "SinusoidalTimeEncoding",
    "TimeEmbedding",
    "UNet3D",
    "build_model",
]
