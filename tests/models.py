"""Tiny models for unit tests."""

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int = 3, cout: int = 8, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), act())


class SmallResNet(nn.Module):
    """A residual CNN with every pattern the passes care about: Conv-BN-Act chains, a residual add,
    a BN without an activation, pooling and a linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, width)
        self.conv1 = ConvBNReLU(width, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(self.conv1(x)))
        x = torch.relu(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))


class DataDependent(nn.Module):
    """Cannot be traced: Python control flow on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x
