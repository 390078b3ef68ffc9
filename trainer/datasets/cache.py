"""A ``.npz`` cache of preprocessed slices in the data folder, so repeated runs start fast.

The key covers the data fingerprint, every source file's size and mtime, the preprocessing spec
and the loader version: change any of them and the cache is rebuilt. A cache that cannot be
written (read-only data) or read (truncated) is logged and ignored, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edge.preprocess.imaging import PreprocessSpec
from trainer.datasets.base import LoadSummary, SkippedFile, SliceSet

log = logging.getLogger(__name__)

CACHE_DIR = ".mededge-cache"
LOADER_VERSION = 3  # 2: nodule_mm (largest nodule cross-section); 3: geometry


def cache_key(kind: str, fingerprint: str, files: Iterable[Path], spec: PreprocessSpec) -> str:
    """A hex key for one dataset + preprocessing combination."""
    digest = hashlib.sha256(f"{kind}:{LOADER_VERSION}:{fingerprint}".encode())
    digest.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for path in files:
        try:
            st = path.stat()
            digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"{path}:missing".encode())
    return digest.hexdigest()[:24]


def cache_file(data_dir: Path, key: str) -> Path:
    return data_dir / CACHE_DIR / f"{key}.npz"


def load_cached(path: Path) -> SliceSet | None:
    """The cached SliceSet, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            nodule_mm = z["nodule_mm"] if meta.get("has_nodule_mm") else None
            geometry = z["geometry"] if meta.get("has_geometry") else None
            skipped = tuple(SkippedFile(s["path"], s["reason"]) for s in meta["skipped"])
            return SliceSet(
                images=z["images"], labels=z["labels"],
                masks=z["masks"] if meta["has_masks"] else None,
                groups=z["groups"].astype(object), splits=z["splits"].astype(object),
                sources=z["sources"].astype(object), fingerprint=meta["fingerprint"],
                summary=LoadSummary(int(z["images"].shape[0]), skipped), nodule_mm=nodule_mm,
                geometry=geometry)
    except Exception as exc:  # a truncated or foreign file: rebuild
        log.warning("ignoring unreadable cache %s: %s", path, exc)
        return None


def save_cached(path: Path, data: SliceSet) -> None:
    """Write the cache atomically; an OSError is logged, not raised."""
    meta = {"fingerprint": data.fingerprint, "has_masks": data.masks is not None,
            "has_nodule_mm": data.nodule_mm is not None,
            "has_geometry": data.geometry is not None,
            "skipped": [{"path": s.path, "reason": s.reason} for s in data.summary.skipped]}
    arrays: dict[str, np.ndarray] = {
        "images": data.images, "labels": data.labels,
        "masks": data.masks if data.masks is not None else np.zeros(0, np.uint8),
        "groups": data.groups.astype(str), "splits": data.splits.astype(str),
        "sources": data.sources.astype(str), "meta": np.asarray(json.dumps(meta)),
        "nodule_mm": data.nodule_mm if data.nodule_mm is not None else np.zeros(0, np.float32),
        "geometry": data.geometry if data.geometry is not None else np.zeros(0, np.float64),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write cache %s: %s", path, exc)
