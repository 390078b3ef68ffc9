"""Detector training data, targets and loss (CenterNet on ``edge.postprocess.detection``).

Boxes come from a COCO file (``labels/boxes_coco.json`` of a synthetic folder, or ``--coco`` for
user data) whose ``file_name`` is the slice's path relative to the data folder, moved into the
model frame with :func:`edge.postprocess.detection.to_model_frame`. Targets are written with
:func:`edge.postprocess.detection.encode_boxes`, the inverse of the serving decoder, so training
and decoding cannot drift: a Gaussian splat per centre on the heatmap (CenterNet's radius for a
box that keeps IoU >= 0.7, sigma = diameter / 6), size and offset at the centre cell only.
Loss: CenterNet's penalty-reduced focal loss on the heatmap plus L1 on size and offset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge.core.errors import DataError
from edge.postprocess.detection import DecodeSpec, encode_boxes, to_model_frame
from edge.preprocess.imaging import PreprocessSpec
from trainer.datasets import SliceSet, load_coco


@dataclass(frozen=True, eq=False)
class DetectionSet:
    """Slices with their boxes: ``boxes[i]`` (K, 4) x0, y0, x1, y1 in model-input pixels,
    ``original_shapes[i]`` the stored (rows, columns), ``image_ids[i]`` the COCO image id."""

    slices: SliceSet
    boxes: tuple[np.ndarray, ...]
    original_shapes: tuple[tuple[int, int], ...]
    image_ids: tuple[int, ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.slices)

    def subset(self, split: str) -> DetectionSet:
        keep = np.flatnonzero(self.slices.splits == split)
        return DetectionSet(self.slices.subset(split), tuple(self.boxes[i] for i in keep),
                            tuple(self.original_shapes[i] for i in keep),
                            tuple(self.image_ids[i] for i in keep), self.labels)


def attach_boxes(slices: SliceSet, coco_path: Path, spec: PreprocessSpec,
                 labels: Sequence[str] = ("nodule",)) -> DetectionSet:
    """Join ``slices`` with the COCO boxes of their files; slices the file lacks are dropped.

    Raises:
        DataError: the COCO file is unusable, or none of its images is among the slices.
    """
    coco = load_coco(coco_path)
    by_file = {img.file_name: img for img in coco.images}
    keep, boxes, shapes, ids = [], [], [], []
    for i, source in enumerate(slices.sources):
        img = by_file.get(str(source))
        if img is None:
            continue
        raw = [b.bbox for b in coco.boxes_of(img.id) if coco.categories[b.category_id] in labels]
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in raw], np.float64).reshape(-1, 4)
        keep.append(i)
        boxes.append(to_model_frame(xyxy, (img.height, img.width), spec).astype(np.float32))
        shapes.append((img.height, img.width))
        ids.append(img.id)
    if not keep:
        raise DataError(f"{coco_path}: none of its images is among the {len(slices)} slices")
    idx = np.asarray(keep)
    s = slices
    sub = SliceSet(images=s.images[idx], labels=s.labels[idx],
                   masks=None if s.masks is None else s.masks[idx], groups=s.groups[idx],
                   splits=s.splits[idx], sources=s.sources[idx], fingerprint=s.fingerprint,
                   summary=s.summary)
    return DetectionSet(sub, tuple(boxes), tuple(shapes), tuple(ids), tuple(labels))


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius (in the units of ``height``/``width``): a box whose corners move by
    this much keeps IoU >= ``min_overlap`` with the original (the smallest of three cases)."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4.0, 2 * (height + width), (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def draw_targets(boxes: Sequence[np.ndarray], height: int, width: int, spec: DecodeSpec,
                 num_classes: int = 1) -> dict[str, np.ndarray]:
    """Targets of a batch: ``heatmap`` (N, C, h, w) in [0, 1] (1 at centre cells), ``size`` and
    ``offset`` (N, 2, h, w) and ``mask`` (N, 1, h, w), 1 where size/offset are supervised.
    All boxes are class 0 (one label); ``h = ceil(height / stride)``."""
    h, w = math.ceil(height / spec.stride), math.ceil(width / spec.stride)
    n = len(boxes)
    heat = np.zeros((n, num_classes, h, w), np.float32)
    size = np.zeros((n, 2, h, w), np.float32)
    offset = np.zeros((n, 2, h, w), np.float32)
    mask = np.zeros((n, 1, h, w), np.float32)
    ys, xs = np.mgrid[0:h, 0:w]
    for i, b in enumerate(boxes):
        if not len(b):
            continue
        cells, offs, sizes = encode_boxes(b, spec)
        for (row, col), off, sz, box in zip(cells, offs, sizes, b, strict=True):
            if not (0 <= row < h and 0 <= col < w):
                continue
            bw, bh = (box[2] - box[0]) / spec.stride, (box[3] - box[1]) / spec.stride
            radius = max(0.0, gaussian_radius(bh, bw))
            sigma = max((2 * radius + 1) / 6, 0.5)
            g = np.exp(-((ys - row) ** 2 + (xs - col) ** 2) / (2 * sigma ** 2))
            np.maximum(heat[i, 0], g.astype(np.float32), out=heat[i, 0])
            heat[i, 0, row, col] = 1.0
            size[i, :, row, col] = sz
            offset[i, :, row, col] = off
            mask[i, 0, row, col] = 1.0
    return {"heatmap": heat, "size": size, "offset": offset, "mask": mask}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0,
               beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, normalised by the number of centres."""
    logp = torch.nn.functional.logsigmoid(logits)
    log1mp = torch.nn.functional.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos = target.eq(1).float()
    pos_loss = -((1 - p) ** alpha) * logp * pos
    neg_loss = -((1 - target) ** beta) * (p ** alpha) * log1mp * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def detection_loss(outputs: Sequence[torch.Tensor], targets: dict[str, torch.Tensor],
                   size_weight: float = 1.0, offset_weight: float = 1.0) -> torch.Tensor:
    """Focal loss on the heatmap plus masked L1 on size (log space) and offset."""
    heat, size, offset = outputs
    mask = targets["mask"]
    n = mask.sum().clamp(min=1.0)
    l_size = (torch.abs(size - targets["size"]) * mask).sum() / n
    l_off = (torch.abs(offset - targets["offset"]) * mask).sum() / n
    return focal_loss(heat.float(), targets["heatmap"]) + size_weight * l_size \
        + offset_weight * l_off


def flip_batch(images: np.ndarray, boxes: Sequence[np.ndarray], rng: np.random.Generator
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random horizontal and vertical flips of images (N, 1, H, W) and their boxes alike."""
    out, out_boxes = images.copy(), []
    height, width = images.shape[-2:]
    for i, b in enumerate(boxes):
        b = b.copy()
        if rng.random() < 0.5:
            out[i] = out[i, :, :, ::-1]
            b[:, [0, 2]] = width - b[:, [2, 0]]
        if rng.random() < 0.5:
            out[i] = out[i, :, ::-1, :]
            b[:, [1, 3]] = height - b[:, [3, 1]]
        out_boxes.append(b)
    return out, out_boxes


def crop_batch(images: np.ndarray, boxes: Sequence[np.ndarray], size: int,
               rng: np.random.Generator, stride: int = 4, focus: float = 0.7,
               lung: np.ndarray | None = None, lung_share: float = 0.0
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random ``size`` x ``size`` windows (origins on the stride grid) of images (N, 1, H, W)
    and their boxes, shifted; a box stays when its centre lies inside the window (clipped to
    it). With probability ``focus`` a slice with boxes gets a window around one of them. The
    detector is fully convolutional: training on windows costs (size / H)^2 of whole slices.
    ``lung`` (N, H, W) bool with ``lung_share`` > 0: that share of the other windows is
    centred on a random lung pixel (vessels in cross-section, hila: the hard negatives)."""
    height, width = images.shape[-2:]
    if size >= min(height, width):
        return images, list(boxes)
    out = np.empty((len(images), images.shape[1], size, size), images.dtype)
    out_boxes = []
    for i, b in enumerate(boxes):
        if len(b) and rng.random() < focus:
            x0, y0, x1, y1 = b[rng.integers(len(b))]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            left = int(np.clip(cx - rng.uniform(0.15, 0.85) * size, 0, width - size))
            top = int(np.clip(cy - rng.uniform(0.15, 0.85) * size, 0, height - size))
        elif lung is not None and lung_share > 0 and rng.random() < lung_share \
                and lung[i].any():
            ys, xs = np.nonzero(lung[i])
            k = int(rng.integers(len(ys)))
            left = int(np.clip(xs[k] - size // 2, 0, width - size))
            top = int(np.clip(ys[k] - size // 2, 0, height - size))
        else:
            left = int(rng.integers(0, width - size + 1))
            top = int(rng.integers(0, height - size + 1))
        left, top = left - left % stride, top - top % stride
        out[i] = images[i, :, top:top + size, left:left + size]
        shifted = b - np.array([left, top, left, top], np.float32)
        centre = (shifted[:, :2] + shifted[:, 2:]) / 2
        inside = np.all((centre >= 0) & (centre < size), axis=1)
        out_boxes.append(np.clip(shifted[inside], 0, size).astype(np.float32))
    return out, out_boxes
