"""Factories for the CLI's ``package.module:factory`` MODEL argument, good and bad."""
from __future__ import annotations

import torch.nn as nn

NUMBER = 3


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU())


def raises() -> nn.Module:
    raise RuntimeError("the factory is broken")


def not_a_module() -> int:
    return 3
