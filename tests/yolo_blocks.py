"""YOLO-style blocks written by hand (no ultralytics), for the torch.export capture tests.

They follow ultralytics' layout and, where it matters, its control flow: ``Conv`` is
Conv2d + BatchNorm + SiLU, ``C2f`` splits, runs bottlenecks on the last piece and concatenates,
``SPPF`` pools three times, ``DetectHead`` loops over levels and builds anchors from each
level's shape (fx cannot unpack a shape), ``TinyYolo`` runs a layer list whose layers read
saved outputs by index, as ``ultralytics.nn.tasks.BaseModel._predict_once`` does, and
``ShapeLoop`` has a loop bound and a branch read from the input's shape.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def autopad(k: int, d: int = 1) -> int:
    return d * (k - 1) // 2


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU, one shared activation module as in ultralytics."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, with ``x +`` the result when ``shortcut`` (activation before the add)."""

    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """1x1 Conv, split in two, ``n`` bottlenecks chained on the last piece, all pieces
    concatenated, 1x1 Conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: one max-pool applied three times, outputs concatenated."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Concat(nn.Module):
    def __init__(self, dim: int = 1):
        super().__init__()
        self.d = dim

    def forward(self, x):
        return torch.cat(x, self.d)


class DetectHead(nn.Module):
    """Per level: a box branch and a class branch (Conv, Conv, 1x1 conv) concatenated; then
    every level flattened and concatenated with anchor points built from its shape. Returns
    ``(predictions, per-level maps)`` like ultralytics' Detect in eval."""

    def __init__(self, nc: int, ch: tuple[int, ...], reg: int = 8):
        super().__init__()
        self.nl, self.no, self.reg = len(ch), nc + reg, reg
        c2, c3 = max(16, ch[0] // 4), max(ch[0], nc)
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, reg, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)

    def forward(self, x: list[torch.Tensor]):
        x = list(x)
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        anchors = []
        for xi in x:
            h, w = xi.shape[2:]  # fx cannot unpack a traced shape
            sy, sx = torch.meshgrid(torch.arange(h).type_as(xi) + 0.5, torch.arange(w).type_as(xi) + 0.5,
                                    indexing="ij")
            anchors.append(torch.stack((sx, sy), -1).view(-1, 2))
        b = x[0].shape[0]
        pred = torch.cat([xi.view(b, self.no, -1) for xi in x], 2)
        anchor_points = torch.cat(anchors).transpose(0, 1).unsqueeze(0)
        box, cls = pred.split((self.reg, self.no - self.reg), 1)
        return torch.cat((box[:, :2] + anchor_points, box[:, 2:], cls.sigmoid()), 1), x


class TinyYolo(nn.Module):
    """A small YOLO: layers with ``f`` (where their input comes from: -1 the previous layer, or
    indices of saved outputs) run by a loop that saves the outputs later layers read."""

    def __init__(self, nc: int = 3, width: int = 8):
        super().__init__()
        w = width
        layers = [
            (-1, Conv(3, w, 3, 2)),                 # 0  P1/2
            (-1, Conv(w, 2 * w, 3, 2)),             # 1  P2/4
            (-1, C2f(2 * w, 2 * w, 1, True)),       # 2
            (-1, Conv(2 * w, 4 * w, 3, 2)),         # 3  P3/8
            (-1, C2f(4 * w, 4 * w, 2, True)),       # 4
            (-1, Conv(4 * w, 8 * w, 3, 2)),         # 5  P4/16
            (-1, C2f(8 * w, 8 * w, 1, True)),       # 6
            (-1, SPPF(8 * w, 8 * w)),               # 7
            (-1, nn.Upsample(None, 2, "nearest")),  # 8
            ([-1, 4], Concat(1)),                   # 9  cat P3
            (-1, C2f(12 * w, 4 * w, 1, False)),     # 10 (P3 out)
            (-1, Conv(4 * w, 4 * w, 3, 2)),         # 11
            ([-1, 7], Concat(1)),                   # 12 cat P4
            (-1, C2f(12 * w, 8 * w, 1, False)),     # 13 (P4 out)
            ([10, 13], DetectHead(nc, (4 * w, 8 * w))),
        ]
        self.model = nn.ModuleList()
        for i, (f, m) in enumerate(layers):
            m.f, m.i = f, i
            self.model.append(m)
        self.save = sorted({j for f, _ in layers for j in ([f] if isinstance(f, int) else f) if j != -1})

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


class ShapeLoop(nn.Module):
    """A loop bound and a branch read from the input's shape: the number of Conv blocks run
    is ``height // 16``, and wide inputs get an extra block."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = Conv(3, c, 3)
        self.blocks = nn.ModuleList(Conv(c, c, 3) for _ in range(4))
        self.wide = Conv(c, c, 3)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        for i in range(x.shape[2] // 16):
            x = self.blocks[i](x)
        if x.shape[-1] > 32:
            x = self.wide(x)
        return self.head(x)


class WithBackbone(nn.Module):
    """A block that takes a list of maps (DetectHead) fed by a tiny three-level backbone."""

    def __init__(self, head_channels: tuple[int, int] = (8, 16)):
        super().__init__()
        c1, c2 = head_channels
        self.p1, self.p2 = Conv(3, c1, 3, 2), Conv(c1, c2, 3, 2)
        self.head = DetectHead(2, (c1, c2))

    def forward(self, x):
        a = self.p1(x)
        return self.head([a, self.p2(a)])
