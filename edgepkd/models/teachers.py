"""Teacher networks for small images. Each builder takes (num_classes, in_chans, image_size, **args)."""

from __future__ import annotations

import torch
import torch.nn as nn

from edgepkd.registry import Registry

TEACHERS: Registry = Registry("teacher")


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """VGG-style: per stage two conv3x3-BN-ReLU then 2x2 max-pool (while the map is >= 2 px), widths w, 2w, 4w."""

    def __init__(self, num_classes: int, in_chans: int, image_size: int, width: int = 32, stages: int = 3,
                 dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = in_chans, image_size
        for i in range(stages):
            cout = width * 2 ** i
            layers += _conv_bn(cin, cout) + _conv_bn(cout, cout)
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            cin = cout
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNet8(nn.Module):
    """MLPerf Tiny image-classification reference ResNet-8 (16/32/64 filters; ~78k params, ~12.5M MACs at 32x32)."""

    def __init__(self, num_classes: int, in_chans: int, image_size: int, widths: tuple = (16, 32, 64)):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(*_conv_bn(in_chans, w1))
        self.stages = nn.Sequential(BasicBlock(w1, w1, 1), BasicBlock(w1, w2, 2), BasicBlock(w2, w3, 2))
        self.num_features = w3
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


@TEACHERS.register("cnn")
def cnn(num_classes: int, in_chans: int, image_size: int, width: int = 32, stages: int = 3, dropout: float = 0.1):
    return SmallCNN(num_classes, in_chans, image_size, width=width, stages=stages, dropout=dropout)


@TEACHERS.register("resnet8")
def resnet8(num_classes: int, in_chans: int, image_size: int, widths: list = (16, 32, 64)):
    return ResNet8(num_classes, in_chans, image_size, widths=tuple(widths))


@TEACHERS.register("resnet18")
def resnet18(num_classes: int, in_chans: int, image_size: int, width: int = 64):
    """torchvision's resnet18 adapted to small images: 3x3 stride-1 stem, no max-pool."""
    from torchvision.models.resnet import BasicBlock as TvBlock, ResNet

    model = ResNet(TvBlock, [2, 2, 2, 2], num_classes=num_classes)
    if width != 64:  # uniformly thinner ResNet-18 for CPU budgets
        _scale_resnet(model, width, num_classes)
    model.conv1 = nn.Conv2d(in_chans, model.bn1.num_features, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _scale_resnet(model, width: int, num_classes: int) -> None:
    """Rebuild torchvision's ResNet-18 layers with base width ``width`` instead of 64."""
    from torchvision.models.resnet import BasicBlock as TvBlock

    model.inplanes = width
    model.bn1 = nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(TvBlock, width, 2)
    model.layer2 = model._make_layer(TvBlock, width * 2, 2, stride=2)
    model.layer3 = model._make_layer(TvBlock, width * 4, 2, stride=2)
    model.layer4 = model._make_layer(TvBlock, width * 8, 2, stride=2)
    model.fc = nn.Linear(width * 8, num_classes)
