"""Model builders: a small 2D ResNet classifier and a 2D U-Net segmenter (MONAI networks).

Both take ``[N, 1, H, W]`` float32 and return logits: ``[N, num_classes]`` for the classifier,
``[N, num_classes, H, W]`` for the segmenter. Softmax is applied by the serving postprocess (the
sidecar says ``activation: softmax``), so the exported graph stays a plain logits model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet as MonaiResNet
from monai.networks.nets import UNet

#: Flip views of :attr:`ModelSpec.flip_views`: the tensor dims each flips ((N, C, H, W)).
#: "z" reverses the channels: the 2.5D context through-plane (head-foot); the one-channel
#: evidence map needs no flipping back along it.
FLIP_DIMS = {"h": (3,), "v": (2,), "hv": (2, 3), "z": (1,), "hz": (1, 3), "vz": (1, 2),
             "hvz": (1, 2, 3)}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture choices, stored in the checkpoint so ``mededge export`` can rebuild it."""

    task: str  # "classify" | "segment"
    num_classes: int
    widths: tuple[int, ...] = field(default=(16, 32, 64, 128))
    layers: tuple[int, ...] = field(default=(1, 1, 1, 1))
    stem_stride: int = 2  # classifier: stride of the 3x3 stem convolution
    stem_pool: bool = True  # classifier: 3x3 stride-2 max-pooling after the stem
    #: classifier: stride of the evidence map. 0 = the deepest stage's own stride (no decoder);
    #: otherwise a top-down (FPN-lite) path brings deeper stages up to this stride.
    head_stride: int = 0
    #: input channels: 1, or 2k + 1 for a 2.5D input (``PreprocessSpec.context_slices`` = k)
    in_channels: int = 1
    #: classifier with a head stride: a second 1x1 head predicts the lung (a stride-cell
    #: touching lung or nodule) and the nodule evidence is gated by it (see NoduleClassifier)
    lung_gate: bool = False
    #: classifier, eval mode (validation, export, serving): the evidence map is averaged over
    #: the input and these flips of it ("h": left-right, "v": front-back, "hv": both; with
    #: "z" added: also reversed through-plane, :data:`FLIP_DIMS`), each
    #: map flipped back, before the maximum; part of the graph, so serving and the trainer's
    #: metric agree. Training runs one view (the augmentation draws the flips).
    flip_views: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(task=str(data["task"]), num_classes=int(data["num_classes"]),
                   widths=tuple(data["widths"]), layers=tuple(data["layers"]),
                   stem_stride=int(data.get("stem_stride", 2)),
                   stem_pool=bool(data.get("stem_pool", True)),
                   head_stride=int(data.get("head_stride", 0)),
                   in_channels=int(data.get("in_channels", 1)),
                   lung_gate=bool(data.get("lung_gate", False)),
                   flip_views=tuple(str(v) for v in data.get("flip_views", ())))


class NoduleClassifier(torch.nn.Module):
    """A ResNet trunk (MONAI ResNet's stem and one stage per entry of ``widths``) with a dense
    nodule-evidence head, pooled by maximum into a slice decision.

    ``dense(x)`` is a per-location nodule logit map (stride 4 * 2**(stages - 1)); the slice's
    positive-class logit is its maximum, the negative-class logit 0, so softmax of the output
    equals sigmoid of the strongest local evidence. Training can supervise the map with nodule
    masks where they exist (far more signal than one label per slice: a 2D slice label alone
    lets a deep network memorise each study's anatomy) and falls back to the slice label only.
    In training mode ``forward`` returns ``(logits, dense)``, in eval mode ``logits``.

    With ``spec.head_stride`` set, an FPN-lite decoder (1x1 laterals, nearest 2x upsampling and
    addition, from the deepest stage down to that stride) feeds the head: the map then keeps
    the spatial detail of the shallow stages (a 6 mm nodule is a few pixels at 256x256) and the
    context of the deep ones (a round blob versus a vessel running through the plane).

    With ``spec.lung_gate`` a second 1x1 head on the same features predicts the lung
    (``lung`` logit per cell) and the map becomes ``evidence - softplus(-lung)`` =
    ``evidence + log sigmoid(lung)``: unchanged inside the lung, pushed down outside it
    (mediastinum, hila, chest wall), where a nodule-like blob is not a lung nodule. In
    training mode ``forward`` then returns ``(logits, evidence, lung)``.

    With ``spec.flip_views`` the eval-mode map (:meth:`dense`, hence the logits and the CAM)
    is the mean of the maps of the input and of its flips, each flipped back: the flips the
    training augmentation draws, averaged inside the graph rather than by the caller.

    Raises:
        ValueError: 1 to 4 stages, a ``head_stride`` that no stage has, or an unknown flip.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        n = len(spec.widths)
        if not 1 <= n <= 4:
            raise ValueError(f"classifier: 1 to 4 stages, got widths {spec.widths}")
        unknown = [v for v in spec.flip_views if v not in FLIP_DIMS]
        if unknown:
            raise ValueError(f"classifier: unknown flip views {unknown}; known: "
                             f"{sorted(FLIP_DIMS)}")
        self.flips = [FLIP_DIMS[v] for v in spec.flip_views]
        # MONAI's ResNet always builds four stages; the trunk keeps the first ``n``.
        widths = list(spec.widths) + [spec.widths[-1]] * (4 - n)
        layers = (list(spec.layers) + [1] * 4)[:4]
        net = MonaiResNet(
            block="basic", layers=layers, block_inplanes=widths, spatial_dims=2,
            n_input_channels=spec.in_channels, conv1_t_size=3, conv1_t_stride=spec.stem_stride,
            no_max_pool=not spec.stem_pool, num_classes=2)
        stages = [net.layer1, net.layer2, net.layer3, net.layer4][:n]
        self.stem = torch.nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
        self.stages = torch.nn.ModuleList(stages)
        first = spec.stem_stride * (2 if spec.stem_pool else 1)
        strides = [first * 2 ** k for k in range(n)]
        if spec.head_stride and spec.head_stride not in strides:
            raise ValueError(f"classifier: head_stride {spec.head_stride} is not one of the "
                             f"stage strides {strides}")
        # Stages whose features the decoder merges: from the head's stride to the deepest.
        self.merge_from = strides.index(spec.head_stride) if spec.head_stride else n - 1
        width = spec.widths[self.merge_from]
        self.laterals = torch.nn.ModuleList(
            torch.nn.Conv2d(spec.widths[k], width, 1) for k in range(self.merge_from, n - 1))
        self.top = (torch.nn.Conv2d(spec.widths[-1], width, 1) if self.merge_from < n - 1
                    else torch.nn.Identity())
        self.head = torch.nn.Sequential(
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.BatchNorm2d(width),
            torch.nn.ReLU(inplace=True), torch.nn.Conv2d(width, 1, 1))
        self.lung_head = torch.nn.Conv2d(width, 1, 1) if spec.lung_gate else None
        if spec.lung_gate and not spec.head_stride:
            raise ValueError("classifier: lung_gate needs a head_stride")
        if spec.head_stride:
            # RetinaNet's prior: every location starts at p = 0.01, so the focal loss on a map
            # that is almost all background starts small instead of swamping the first steps.
            torch.nn.init.constant_(self.head[-1].bias, -math.log(99.0))

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The (gated) nodule-logit map the slice decision is the maximum of; in eval mode
        averaged over the flip views (``spec.flip_views``)."""
        dense = self._gated(x)
        if self.training or not self.flips:
            return dense
        for dims in self.flips:
            dense = dense + self._gated(torch.flip(x, dims)).flip(dims)
        return dense / (len(self.flips) + 1)

    def _gated(self, x: torch.Tensor) -> torch.Tensor:
        evidence, lung = self.maps(x)
        return evidence if lung is None else evidence - F.softplus(-lung)

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The raw nodule-evidence map and, with ``lung_gate``, the lung-logit map."""
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        y = self.top(feats[-1])
        for k in range(len(feats) - 2, self.merge_from - 1, -1):
            y = torch.nn.functional.interpolate(y, size=feats[k].shape[-2:], mode="nearest")
            y = y + self.laterals[k - self.merge_from](feats[k])
        if self.lung_head is None:
            return self.head(y), None
        features = self.head[:-1](y)
        return self.head[-1](features), self.lung_head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if not self.training:
            positive = torch.amax(self.dense(x), dim=(2, 3))
            return torch.cat([torch.zeros_like(positive), positive], dim=1)
        evidence, lung = self.maps(x)
        dense = evidence if lung is None else evidence - F.softplus(-lung)
        positive = torch.amax(dense, dim=(2, 3))
        logits = torch.cat([torch.zeros_like(positive), positive], dim=1)
        return (logits, evidence) if lung is None else (logits, evidence, lung)


def build_classifier(spec: ModelSpec) -> torch.nn.Module:
    """The slice classifier (:class:`NoduleClassifier`); binary only.

    The stem is a 3x3 stride-2 convolution followed by 3x3 max-pooling: 4x down before the
    first block, which keeps a 2-core CPU budget at 256x256 input. A 3x3 kernel (not 7x7) and
    max-pooling keep small bright blobs: nodules are only a few pixels across.

    Raises:
        ValueError: ``num_classes`` is not 2.
    """
    if spec.num_classes != 2:
        raise ValueError("the nodule classifier is binary (num_classes=2)")
    return NoduleClassifier(spec)


def build_segmenter(spec: ModelSpec) -> torch.nn.Module:
    """A residual 2D U-Net (MONAI ``UNet``), batch norm, one input channel."""
    return UNet(spatial_dims=2, in_channels=spec.in_channels, out_channels=spec.num_classes,
                channels=tuple(spec.widths), strides=(2,) * (len(spec.widths) - 1),
                num_res_units=1, norm="batch")


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the network ``spec`` describes.

    Raises:
        ValueError: unknown task.
    """
    if spec.task == "classify":
        return build_classifier(spec)
    if spec.task == "segment":
        return build_segmenter(spec)
    raise ValueError(f"no model for task {spec.task!r}")


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes taken by the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, device: torch.device,
            batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities of ``images`` (N, C, H, W; float32, or float16 cast batch by
    batch), in eval mode, as float32 numpy."""
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, images.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size],
                                                  dtype=np.float32)).to(device)
        outs.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    model.train(was_training)
    if not outs:
        return np.zeros((0,), np.float32)
    return np.concatenate(outs).astype(np.float32, copy=False)
