"""The backbone registry: every architecture an embedding model can be built on, in one place.

`ModelConfig.arch` names a key of BACKBONES. The CLI help, the launchpad's field descriptions
and the tests read the names and descriptions from here. This module imports torch only when a
backbone is built, so a Dagster code location can list the backbones without loading torch.

Adding a backbone: one entry below (a description and a function in_channels -> (feature-map
module, its channel count)), and tests/fct_ml/test_models.py's expected output size.

Deferred imports: torch and torchvision load when a backbone is built, not when the registry
is read, so `fct --help` and the launchpad load without them (tests/test_registries.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn

Build = Callable[[int], "tuple[nn.Module, int]"]


@dataclass(frozen=True)
class Backbone:
    description: str
    build: Build  # in_channels -> (module mapping (N, C, H, W) to a feature map, its channels)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    import torch.nn as nn

    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def small_cnn(widths: tuple[int, int, int]) -> Build:
    """A VGG-style CNN: three stages of two 3x3 conv-BN-ReLU, 2x2 max-pool between stages."""

    def build(in_channels: int) -> tuple[nn.Module, int]:
        import torch.nn as nn

        w1, w2, w3 = widths
        layers = [
            *_conv_bn_relu(in_channels, w1),
            *_conv_bn_relu(w1, w1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w1, w2),
            *_conv_bn_relu(w2, w2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w2, w3),
            *_conv_bn_relu(w3, w3),
        ]
        return nn.Sequential(*layers), w3

    return build


def small_image_resnet(name: str) -> Build:
    """A torchvision ResNet with the CIFAR stem (3x3 stride-1 conv, no max-pool) for 8-64 px images."""

    def build(in_channels: int) -> tuple[nn.Module, int]:
        import torch.nn as nn
        import torchvision

        net = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}[
            name
        ](weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        body = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.layer1, net.layer2, net.layer3, net.layer4
        )
        return body, net.fc.in_features

    return build


BACKBONES: dict[str, Backbone] = {
    "cnn-xs": Backbone("VGG-style CNN, widths 8-16-32 (tests)", small_cnn((8, 16, 32))),
    "cnn-s": Backbone("VGG-style CNN, widths 16-32-64 (CPU presets)", small_cnn((16, 32, 64))),
    "cnn-m": Backbone("VGG-style CNN, widths 32-64-128", small_cnn((32, 64, 128))),
    "resnet18": Backbone("ResNet-18, CIFAR stem", small_image_resnet("resnet18")),
    "resnet50": Backbone("ResNet-50, CIFAR stem (the paper's)", small_image_resnet("resnet50")),
}


def backbone_names() -> str:
    """`cnn-xs | cnn-s | ...`: the registered names, for help texts."""
    return " | ".join(BACKBONES)
