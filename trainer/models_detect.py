"""The nodule detector: a small ResNet trunk (the classifier's, MONAI ResNet blocks) with a
feature-pyramid merge to stride 4 and CenterNet heads.

Input ``[N, C, H, W]`` float32 (``C`` 1, or 2k + 1 for a 2.5D input; ``H``, ``W`` multiples
of 16); outputs, in this order and named so
in ONNX (``docs/detection.md``): ``heatmap`` ``[N, C, H/4, W/4]`` logits, ``size``
``[N, 2, H/4, W/4]`` log (width, height) in input pixels, ``offset`` ``[N, 2, H/4, W/4]`` the
centre's position inside its cell (sigmoid, so in (0, 1)). No decoding or NMS in the graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet as MonaiResNet

HEAD_NAMES = ("heatmap", "size", "offset")
STRIDE = 4


@dataclass(frozen=True)
class DetectorSpec:
    """Architecture of :class:`CenterNetDetector`; stored in checkpoints."""

    num_classes: int = 1
    widths: tuple[int, ...] = field(default=(16, 32, 64))
    layers: tuple[int, ...] = field(default=(1, 1, 1))
    head_width: int = 32
    prior: float = 0.01  # initial heatmap probability (focal-loss bias init)
    in_channels: int = 1  # 2k + 1 for a 2.5D input (PreprocessSpec.context_slices = k)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "task": "detect", "stride": STRIDE}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorSpec:
        return cls(num_classes=int(data["num_classes"]), widths=tuple(data["widths"]),
                   layers=tuple(data["layers"]), head_width=int(data["head_width"]),
                   prior=float(data.get("prior", 0.01)),
                   in_channels=int(data.get("in_channels", 1)))


def _head(width: int, out: int, bias: float = 0.0) -> torch.nn.Conv2d:
    head = torch.nn.Conv2d(width, out, 1)
    torch.nn.init.constant_(head.bias, bias)
    return head


class CenterNetDetector(torch.nn.Module):
    """Stem (3x3 stride 2 + max-pool: stride 4), one ResNet stage per width (stride 4, 8, 16,
    ...), top-down merge back to stride 4 (1x1 laterals, nearest upsampling), one shared 3x3
    convolution, three 1x1 heads (CenterNet gives each head its own 3x3 layer; sharing it keeps
    the stride-4 compute, most of the total, affordable on a CPU)."""

    def __init__(self, spec: DetectorSpec) -> None:
        super().__init__()
        n = len(spec.widths)
        if not 1 <= n <= 4:
            raise ValueError(f"detector: 1 to 4 stages, got widths {spec.widths}")
        widths = list(spec.widths) + [spec.widths[-1]] * (4 - n)
        layers = (list(spec.layers) + [1] * 4)[:4]
        net = MonaiResNet(block="basic", layers=layers, block_inplanes=widths, spatial_dims=2,
                          n_input_channels=spec.in_channels, conv1_t_size=3, conv1_t_stride=2,
                          no_max_pool=False, num_classes=2)
        self.stem = torch.nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
        self.stages = torch.nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4][:n])
        w = spec.head_width
        self.laterals = torch.nn.ModuleList(torch.nn.Conv2d(c, w, 1) for c in spec.widths)
        self.smooth = torch.nn.Sequential(torch.nn.Conv2d(w, w, 3, padding=1),
                                          torch.nn.BatchNorm2d(w), torch.nn.ReLU(inplace=True))
        self.heatmap = _head(w, spec.num_classes, -math.log((1 - spec.prior) / spec.prior))
        self.size = _head(w, 2, math.log(8.0))
        self.offset = _head(w, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = []
        y = self.stem(x)
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        top = self.laterals[-1](feats[-1])
        for lateral, feat in zip(reversed(self.laterals[:-1]), reversed(feats[:-1]),
                                 strict=True):
            top = F.interpolate(top, size=feat.shape[-2:], mode="nearest") + lateral(feat)
        f = self.smooth(top)
        return self.heatmap(f), self.size(f), torch.sigmoid(self.offset(f))


def build_detector(spec: DetectorSpec) -> CenterNetDetector:
    """The detector ``spec`` describes.

    Raises:
        ValueError: more than four or no stages.
    """
    return CenterNetDetector(spec)
