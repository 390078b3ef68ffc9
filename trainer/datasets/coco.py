"""COCO detection JSON (boxes): loaded and validated now, used by detection training later.

Structure errors (not JSON, no ``images``/``annotations``/``categories`` lists) raise; a bad
individual image or annotation is skipped and listed, like any other bad input.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.core.errors import DataError
from trainer.datasets.base import SkippedFile


@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class CocoBox:
    """One annotation: ``bbox`` is (x, y, width, height) in pixels, COCO's convention."""

    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class CocoDataset:
    images: tuple[CocoImage, ...]
    boxes: tuple[CocoBox, ...]
    categories: dict[int, str]
    skipped: tuple[SkippedFile, ...]

    def boxes_of(self, image_id: int) -> tuple[CocoBox, ...]:
        return tuple(b for b in self.boxes if b.image_id == image_id)


def _image(entry: dict[str, Any], data_dir: Path | None) -> CocoImage:
    img = CocoImage(int(entry["id"]), str(entry["file_name"]), int(entry["width"]),
                    int(entry["height"]))
    if img.width <= 0 or img.height <= 0:
        raise ValueError(f"size {img.width}x{img.height} is not positive")
    if data_dir is not None and not (data_dir / img.file_name).is_file():
        raise ValueError(f"file {img.file_name} does not exist")
    return img


def _box(entry: dict[str, Any], images: dict[int, CocoImage], cats: dict[int, str]) -> CocoBox:
    bbox = tuple(float(v) for v in entry["bbox"])
    if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
        raise ValueError(f"bbox {entry['bbox']!r} is not four finite numbers")
    box = CocoBox(int(entry["id"]), int(entry["image_id"]), int(entry["category_id"]),
                  bbox)  # type: ignore[arg-type]
    if box.image_id not in images:
        raise ValueError(f"image_id {box.image_id} is not in 'images'")
    if box.category_id not in cats:
        raise ValueError(f"category_id {box.category_id} is not in 'categories'")
    x, y, w, h = bbox
    img = images[box.image_id]
    inside = x >= 0 and y >= 0 and x + w <= img.width + 1e-6 and y + h <= img.height + 1e-6
    if w <= 0 or h <= 0 or not inside:
        raise ValueError(f"bbox {list(bbox)} is empty or outside the "
                         f"{img.width}x{img.height} image")
    return box


def load_coco(path: Path, data_dir: Path | None = None) -> CocoDataset:
    """Read and validate a COCO detection file; ``data_dir`` set: image files must exist.

    Raises:
        DataError: unreadable, not JSON, or missing the three top-level lists; names the file.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read COCO JSON: {exc}") from exc
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            raise DataError(f"{path}: COCO JSON needs a {key!r} list")
    skipped: list[SkippedFile] = []
    cats: dict[int, str] = {}
    for c in doc["categories"]:
        try:
            cats[int(c["id"])] = str(c["name"])
        except (KeyError, TypeError, ValueError) as exc:
            skipped.append(SkippedFile(str(path), f"category {c!r}: {exc}"))
    images: dict[int, CocoImage] = {}
    for entry in doc["images"]:
        try:
            img = _image(entry, data_dir)
            if img.id in images:
                raise ValueError(f"duplicate image id {img.id}")
            images[img.id] = img
        except (KeyError, TypeError, ValueError) as exc:
            skipped.append(SkippedFile(str(path), f"image {entry.get('id', '?')}: {exc}"))
    boxes: list[CocoBox] = []
    for entry in doc["annotations"]:
        try:
            boxes.append(_box(entry, images, cats))
        except (KeyError, TypeError, ValueError) as exc:
            skipped.append(SkippedFile(str(path), f"annotation {entry.get('id', '?')}: {exc}"))
    return CocoDataset(tuple(images.values()), tuple(boxes), cats, tuple(skipped))
