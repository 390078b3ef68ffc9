"""Model builders: a small 2D ResNet classifier and a 2D U-Net segmenter (MONAI networks).

Both take ``[N, 1, H, W]`` float32 and return logits: ``[N, num_classes]`` for the classifier,
``[N, num_classes, H, W]`` for the segmenter. Softmax is applied by the serving postprocess (the
sidecar says ``activation: softmax``), so the exported graph stays a plain logits model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from monai.networks.nets import ResNet as MonaiResNet
from monai.networks.nets import UNet


@dataclass(frozen=True)
class ModelSpec:
    """Architecture choices, stored in the checkpoint so ``mededge export`` can rebuild it."""

    task: str  # "classify" | "segment"
    num_classes: int
    widths: tuple[int, ...] = field(default=(16, 32, 64, 128))
    layers: tuple[int, ...] = field(default=(1, 1, 1, 1))
    stem_stride: int = 2  # classifier: stride of the 3x3 stem convolution
    stem_pool: bool = True  # classifier: 3x3 stride-2 max-pooling after the stem

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(task=str(data["task"]), num_classes=int(data["num_classes"]),
                   widths=tuple(data["widths"]), layers=tuple(data["layers"]),
                   stem_stride=int(data.get("stem_stride", 2)),
                   stem_pool=bool(data.get("stem_pool", True)))


def build_classifier(spec: ModelSpec) -> torch.nn.Module:
    """A ResNet of basic blocks, 2D, one input channel.

    The stem is a 3x3 stride-2 convolution followed by 3x3 max-pooling: 4x down before the
    first block, as in the usual ResNet, which keeps a 2-core CPU budget at 256x256 input. A
    3x3 kernel (not 7x7) and max-pooling keep small bright blobs: nodules are only a few pixels
    across, and max-pooling passes a one-pixel response where averaging would dilute it.
    """
    return MonaiResNet(
        block="basic", layers=list(spec.layers), block_inplanes=list(spec.widths),
        spatial_dims=2, n_input_channels=1, conv1_t_size=3, conv1_t_stride=spec.stem_stride,
        no_max_pool=not spec.stem_pool, num_classes=spec.num_classes)


def build_segmenter(spec: ModelSpec) -> torch.nn.Module:
    """A residual 2D U-Net (MONAI ``UNet``), batch norm, one input channel."""
    return UNet(spatial_dims=2, in_channels=1, out_channels=spec.num_classes,
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
    """Softmax probabilities of ``images`` (N, 1, H, W), in eval mode, as float32 numpy."""
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, images.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
        outs.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    model.train(was_training)
    if not outs:
        return np.zeros((0,), np.float32)
    return np.concatenate(outs).astype(np.float32, copy=False)
