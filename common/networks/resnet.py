"""ResNet-50 trunk (He et al. 2016, "v1.5": stride on the 3x3 conv) for the CNN branches.

Attribute names follow torchvision's ``resnet50`` (``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layer1``..``layer4``; bottlenecks ``conv1/bn1/conv2/bn2/conv3/bn3/downsample.{0,1}``), so the
ImageNet checkpoint ``resnet50-0676ba61.pth`` loads with no renaming and torchvision is not needed.
MONAI's ResNet differs (a bias in the shortcut conv), which would change parameter counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks.layers import Conv2dReLU

__all__ = ["Bottleneck", "ResNetTrunk", "resnet50_trunk"]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels) with BN and ReLU, plus the (projected) identity."""

    expansion = 4
    # each convolution's batch norm, for fuse_conv_bn_for_inference (the forward applies them in pairs)
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    # the 3x3 convolution whose (folded) norm the forward follows with a ReLU, for fuse_conv_relu_for_inference
    conv_relu = (("conv2", "bn2"),)

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if not isinstance(self.conv2, Conv2dReLU):  # fused for inference: the convolution applied it
            y = self.relu(y)
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNetTrunk(nn.Module):
    """Stem + ``len(layers)`` bottleneck stages; ``forward`` returns every stage's output.

    Args:
        layers: bottlenecks per stage (ResNet-50: 3, 4, 6, 3).
        in_channels: image channels.
        num_stages: how many stages to build (MSSMamba uses the first 3).
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), in_channels: int = 3, num_stages: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels, self.out_channels = 64, []
        for i, blocks in enumerate(list(layers)[:num_stages]):
            planes = 64 * 2**i
            stage = [Bottleneck(channels, planes, stride=1 if i == 0 else 2)]
            channels = planes * Bottleneck.expansion
            stage += [Bottleneck(channels, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            self.out_channels.append(channels)
        self.num_stages = min(num_stages, len(layers))
        self.conv_bn_pairs = (("conv1", "bn1"),)  # the stem, for fuse_conv_bn_for_inference
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            features.append(x)
        return features


def resnet50_trunk(in_channels: int = 3, num_stages: int = 4) -> ResNetTrunk:
    """ResNet-50 (3, 4, 6, 3 bottlenecks); the first ``num_stages`` stages."""
    return ResNetTrunk((3, 4, 6, 3), in_channels, num_stages)
