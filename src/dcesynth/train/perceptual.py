"""MedicalNet (Med3D) ResNet-10 feature extractor for the perceptual loss, from a local file only.

The paper's perceptual term compares Med3D features (Chen et al. 2019, "Med3D: Transfer Learning
for 3D Medical Image Analysis", github.com/Tencent/MedicalNet) of the prediction and the target.
The reference code fetches those weights from a hub at run time; here they are read from a file
the user names, and without one the perceptual term is off, never computed with random weights.

The architecture is MedicalNet's ``resnet10``: BasicBlock, layers ``[1, 1, 1, 1]``, shortcut
type ``B`` (1x1x1 conv + BatchNorm downsample), conv1 7x7x7 stride 2, and layer3/layer4 with
stride 1 and dilation 2/4. Parameter names follow MedicalNet's state dict (``conv1.weight``,
``layer2.0.downsample.0.weight``, ...) so ``resnet_10.pth`` and ``resnet_10_23dataset.pth`` load.
"""

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn

logger = logging.getLogger("dcesynth")

PERCEPTUAL_OFF_MESSAGE = (
    "perceptual loss off: no --perceptual-weights file given "
    "(MedicalNet ResNet-10 weights are never downloaded)"
)
# MedicalNet checkpoints hold a segmentation head the feature extractor does not use.
SEGMENTATION_HEAD_PREFIX = "conv_seg."


def _conv3x3x3(in_channels: int, out_channels: int, stride: int, dilation: int) -> nn.Conv3d:
    return nn.Conv3d(
        in_channels,
        out_channels,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        bias=False,
    )


class BasicBlock(nn.Module):
    """MedicalNet residual block: two 3x3x3 convolutions with BatchNorm, ReLU and a shortcut.

    Args:
        in_channels: channels of the block input.
        out_channels: channels of the block output.
        stride: stride of the first convolution (and of the shortcut projection).
        dilation: dilation of both convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3x3(in_channels, out_channels, stride, dilation)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3x3(out_channels, out_channels, 1, dilation)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, C_in, X, Y, Z)`` to ``(B, C_out, X/stride, Y/stride, Z/stride)``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class MedicalNetResNet10(nn.Module):
    """MedicalNet 3-D ResNet-10 backbone returning the output of each of its four stages.

    The network is a frozen feature extractor: it stays in eval mode (BatchNorm keeps its
    pretrained running statistics) even when a parent module calls ``train()``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64, stride=1, dilation=1))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, stride=2, dilation=1))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, stride=1, dilation=2))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, stride=1, dilation=4))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "MedicalNetResNet10":
        """Keep eval mode whatever ``mode`` is: the pretrained statistics must not change."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Extract features.

        Args:
            x: volume ``(B, 1, X, Y, Z)``, z-scored as in MedicalNet's training.

        Returns:
            Outputs of layer1..layer4: ``(B, 64, X/4, Y/4, Z/4)``, ``(B, 128, X/8, Y/8, Z/8)``,
            ``(B, 256, X/8, ...)`` and ``(B, 512, X/8, ...)`` (sizes rounded up).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


def _read_state_dict(path: Path) -> Mapping[str, object]:
    """Read a ``.safetensors`` file or a ``torch.save`` file without running pickled code."""
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: cannot read perceptual weights file ({err})") from err
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # The weights-only unpickler fails on damaged bytes with many exception types (IndexError,
    # UnpicklingError, RuntimeError, EOFError, ...): each means the same thing to the user.
    except Exception as err:
        raise ValueError(f"{path}: cannot read perceptual weights file ({err})") from err
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{path}: expected a state dict (or a dict with a 'state_dict' key), "
            f"got {type(checkpoint).__name__}"
        )
    return checkpoint


def _backbone_state(state: Mapping[str, object], path: Path) -> dict[str, Tensor]:
    """Strip the ``module.`` prefix of DataParallel checkpoints and drop the segmentation head."""
    backbone = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{path}: entry {key!r} is not a tensor ({type(value).__name__})")
        name = key.removeprefix("module.")
        if not name.startswith(SEGMENTATION_HEAD_PREFIX):
            backbone[name] = value
    return backbone


def _key_summary(keys: list[str]) -> str:
    shown = ", ".join(keys[:5])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > 5 else shown


def load_perceptual_network(path: Path | None) -> MedicalNetResNet10 | None:
    """Load the frozen MedicalNet ResNet-10 from a local weights file.

    Accepted files: a ``torch.save`` state dict, plain or as MedicalNet stores it
    (``{"state_dict": {"module.conv1.weight": ...}}``), or a ``.safetensors`` file with the
    plain keys. MedicalNet's ``conv_seg.*`` segmentation head is ignored; every backbone key
    must be present and no other key may appear.

    Args:
        path: the weights file, or None to switch the perceptual loss off.

    Returns:
        The network in eval mode with ``requires_grad`` False, or None when ``path`` is None
        (one warning on the ``dcesynth`` logger says the perceptual term is off).

    Raises:
        ValueError: the file does not exist, cannot be read, or its keys or tensor shapes do
            not match the MedicalNet ResNet-10 layout. The message names the file.
    """
    if path is None:
        logger.warning(PERCEPTUAL_OFF_MESSAGE)
        return None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: perceptual weights file not found")
    state = _backbone_state(_read_state_dict(path), path)
    network = MedicalNetResNet10()
    try:
        incompatible = network.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: tensor shapes do not match MedicalNet ResNet-10 ({err})"
        ) from err
    if incompatible.missing_keys or incompatible.unexpected_keys:
        problems = []
        if incompatible.missing_keys:
            problems.append(f"missing keys: {_key_summary(incompatible.missing_keys)}")
        if incompatible.unexpected_keys:
            problems.append(f"unexpected keys: {_key_summary(incompatible.unexpected_keys)}")
        raise ValueError(f"{path}: not a MedicalNet ResNet-10 state dict ({'; '.join(problems)})")
    return network


def _zscore(volume: Tensor, eps: float = 1e-6) -> Tensor:
    """Z-score each sample of ``(B, 1, X, Y, Z)``; ``eps`` keeps flat (masked) volumes finite."""
    mean = volume.mean(dim=(1, 2, 3, 4), keepdim=True)
    variance = volume.var(dim=(1, 2, 3, 4), keepdim=True)
    return (volume - mean) / torch.sqrt(variance + eps)


def _unit_channels(features: Tensor, eps: float = 1e-10) -> Tensor:
    """Scale each voxel's feature vector to unit length; ``eps`` keeps zero vectors finite."""
    return features / torch.sqrt(features.pow(2).sum(dim=1, keepdim=True) + eps)


def perceptual_loss(network: nn.Module, pred: Tensor, target: Tensor) -> Tensor:
    """MedicalNet feature distance between prediction and target, averaged over the batch.

    Follows MONAI's ``MedicalNetPerceptualSimilarity`` (which the reference code used through
    ``PerceptualLoss(network_type="medicalnet_resnet10_23datasets")``): each volume is z-scored
    as in MedicalNet's training, features are scaled to unit length over channels, and the
    squared difference is summed over channels and averaged over voxels. Here that distance is
    averaged over the outputs of all four stages rather than the last one only: the shallow
    stages keep fine texture, cost nothing extra, and each stage's distance lies in [0, 4] so
    the scale of the term is unchanged.

    The network runs under the caller's autocast; the distance is computed in float32.

    Args:
        network: a frozen feature extractor returning a list of ``(B, C, x, y, z)`` maps.
        pred: predicted volume ``(B, 1, X, Y, Z)``.
        target: target volume ``(B, 1, X, Y, Z)``.

    Returns:
        Scalar tensor, differentiable with respect to ``pred``.
    """
    pred_features = network(_zscore(pred))
    with torch.no_grad():
        target_features = network(_zscore(target))
    distances = [
        (_unit_channels(p.float()) - _unit_channels(t.float())).pow(2).sum(dim=1).mean()
        for p, t in zip(pred_features, target_features, strict=True)
    ]
    return torch.stack(distances).mean()
