"""The classifier: torchvision trunk -> transition conv -> LSE pooling -> linear layer -> logits (Wang et al. 2017).

`features()` (trunk + transition) and `head()` (pool + linear) are split so heatmaps need no hooks (cam.py).
Sigmoid is applied once, outside the model.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision
from torch import nn

from .meta import TRANSITION_CHANNELS

# arch -> (torchvision builder, weights enum name, trunk output channels); keys == meta.ARCH_NAMES (tested)
ARCHS: dict[str, tuple[str, str, int]] = {
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    "densenet121": ("densenet121", "DenseNet121_Weights", 1024),
    "efficientnet_b1": ("efficientnet_b1", "EfficientNet_B1_Weights", 1280),
    # Small trunk for smoke runs and fast tests; same head.
    "resnet18": ("resnet18", "ResNet18_Weights", 512),
}
# Input pixels per heatmap cell. 32 is the trunks' own; 16 and 8 (ResNets only) keep the last one or two stages at
# the resolution before them, dilating their later convolutions (DeepLab, Chen et al. 2017) so each cell still sees
# as much of the image. The weights are the same tensors at every stride, so ImageNet weights load unchanged.
OUTPUT_STRIDES = (8, 16, 32)


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but can be neither found in the cache nor downloaded."""


class LSEPool2d(nn.Module):
    """Log-sum-exp pooling (Wang et al. 2017): (1/r) log(mean_ij exp(r x_ij)); (N, C, H, W) -> (N, C) float32.

    Computed as logsumexp - log(H*W), which never overflows, and in float32 even under autocast
    (exp(10 x) in float16 overflows for x > 1.1).
    """

    def __init__(self, r: float = 10.0) -> None:
        super().__init__()
        if not r > 0:
            raise ValueError(f"LSE r must be positive, got {r}")
        self.r = float(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float().flatten(2)
            return (torch.logsumexp(self.r * x, dim=2) - math.log(x.shape[2])) / self.r

    def extra_repr(self) -> str:
        return f"r={self.r}"


def _weights_enum(arch: str):
    return getattr(torchvision.models, ARCHS[arch][1]).IMAGENET1K_V1


def _load_trunk(arch: str, pretrained: bool) -> nn.Module:
    builder = getattr(torchvision.models, ARCHS[arch][0])
    if not pretrained:
        return builder(weights=None)
    weights = _weights_enum(arch)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return builder(weights=weights)
    except Exception as exc:  # URLError, socket errors, hash mismatch of a partial download...
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for {arch} are not cached at {cached} and could not be downloaded ({exc}). "
            f"Run once with internet access, or copy {weights.url} to {cached}, "
            "or build the model without them (pretrained=False: random initialisation)."
        ) from None


def _dilate_resnet(net: nn.Module, output_stride: int) -> None:
    """Make a torchvision ResNet's output stride 16 (layer4) or 8 (layer3 and layer4) in place.

    torchvision does this itself for Bottleneck ResNets (`replace_stride_with_dilation`) but refuses it for
    BasicBlock ones (ResNet-18), so it is done here the same way for both: the stage's first block keeps the
    previous dilation with stride 1 (its 3x3 conv and its downsample), the later 3x3 convs get the new dilation.
    """
    stages = {16: [net.layer4], 8: [net.layer3, net.layer4]}[output_stride]
    dilation = 1
    for stage in stages:
        first = stage[0]
        strided = first.conv2 if first.conv2.stride == (2, 2) else first.conv1  # Bottleneck v1.5 | BasicBlock
        strided.stride, strided.dilation, strided.padding = (1, 1), (dilation, dilation), (dilation, dilation)
        first.downsample[0].stride = (1, 1)
        dilation *= 2
        for block in stage:
            for conv in block.modules():
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv is not strided:
                    conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)


def _trunk_layers(arch: str, net: nn.Module) -> nn.Module:
    if arch.startswith("resnet"):
        return nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
    if arch == "densenet121":
        # torchvision's DenseNet applies the final ReLU in forward(), outside .features.
        return nn.Sequential(net.features, nn.ReLU(inplace=False))
    if arch == "efficientnet_b1":
        return net.features
    raise ValueError(f"unknown arch {arch!r}")


class ChestXrayNet(nn.Module):
    """Trunk -> Conv2d(C, 1024, k) -> LSEPool2d(r) -> Linear(1024, L); forward (N, 3, S, S) -> logits (N, L).

    output_stride (8, 16 or 32; below 32 for the ResNets only) sets the heatmap's cells: S/output_stride a side.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        num_labels: int = 14,
        lse_r: float = 10.0,
        transition_kernel: int = 3,
        pretrained: bool = False,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
        if not lse_r > 0 or not math.isfinite(lse_r):
            raise ValueError(f"LSE r must be finite and positive, got {lse_r}")
        if transition_kernel < 1 or transition_kernel % 2 == 0:
            raise ValueError(f"transition kernel must be odd and positive, got {transition_kernel}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        if output_stride != 32 and not arch.startswith("resnet"):
            raise ValueError(f"output stride {output_stride} is available for the ResNet trunks only; {arch} has 32")
        self.arch, self.output_stride = arch, output_stride
        net = _load_trunk(arch, pretrained)
        if output_stride != 32:
            _dilate_resnet(net, output_stride)
        self.trunk = _trunk_layers(arch, net)
        self.transition = nn.Conv2d(
            ARCHS[arch][2], TRANSITION_CHANNELS, transition_kernel, padding=transition_kernel // 2, bias=True
        )
        self.pool = LSEPool2d(lse_r)
        self.classifier = nn.Linear(TRANSITION_CHANNELS, num_labels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk + transition: (N, 3, S, S) -> A (N, 1024, h, w), h = ceil(S / output_stride)."""
        return self.transition(self.trunk(x))

    def head(self, a: torch.Tensor) -> torch.Tensor:
        """LSE pool + linear: A (N, 1024, h, w) -> logits (N, L) float32."""
        return self.classifier(self.pool(a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    arch: str, num_labels: int, lse_r: float = 10.0, transition_kernel: int = 3, pretrained: bool = False,
    output_stride: int = 32,
) -> ChestXrayNet:
    """Build a ChestXrayNet; pretrained=True loads ImageNet weights (raises PretrainedWeightsUnavailable offline).

    Raises ValueError for an unknown arch, an even kernel, or an output stride the trunk cannot give."""
    return ChestXrayNet(arch, num_labels, lse_r, transition_kernel, pretrained, output_stride)
