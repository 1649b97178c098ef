"""Small models and data shared by the importance tests and their torchrun worker."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def block(cin, cout, k=3, g=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, 1, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Sequential(block(c, 2 * c, 1), block(2 * c, 2 * c, 3, g=2 * c), block(2 * c, c, 1, act=False))

    def forward(self, x):
        return x + self.conv(x)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(block(1, 6), Residual(6), block(6, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3)).eval()


def data(seed: int = 1, n: int = 24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


def neg_loss(batches):
    @torch.no_grad()
    def evaluate(module):
        module.eval()
        return -sum(F.cross_entropy(module(x), y).item() for x, y in batches) / len(batches)

    return evaluate
