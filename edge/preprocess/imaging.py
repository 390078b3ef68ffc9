"""Preprocessing written once and imported by both the trainer and the edge runtime.

Steps, in order: modality LUT (stored value -> HU, PS3.3 C.11.1), MONOCHROME1 inversion, window
(PS3.3 C.11.2, linear), resize or letterbox to the model's input, normalisation. Everything is
numpy/opencv; no torch, so training and serving cannot drift apart.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import cv2
import numpy as np

from edge.core.errors import ConfigError
from edge.preprocess.context import MAX_CONTEXT_SLICES


class ResizeMode(str, enum.Enum):
    """How an image is fitted to the model's input size."""

    RESIZE = "resize"  # stretch to the target size
    LETTERBOX = "letterbox"  # keep aspect ratio, pad with the minimum


@dataclass(frozen=True)
class PixelMeta:
    """What preprocessing needs to know about stored pixels (from the DICOM header)."""

    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    photometric_interpretation: str = "MONOCHROME2"


@dataclass(frozen=True)
class PreprocessSpec:
    """The recipe stored in a model's sidecar and applied identically in training and serving.

    ``window_center``/``window_width`` in output units of the modality LUT (HU for CT); both None
    means min-max scaling per image (radiographs). After windowing values lie in [0, 1]; then
    ``(x - mean) / std``.

    ``context_slices`` (k) > 0 makes a 2.5D input: each slice is stacked with its k neighbours
    on each side along the slice normal, 2k + 1 channels, the slice itself in the middle and
    the outermost slice repeated at the ends (:mod:`edge.preprocess.context`). 0: one channel.
    ``context_spacing_mm`` (with ``context_slices``): the neighbours are the volume at multiples
    of this distance along the normal (linear between slices) instead of the next slices.
    """

    height: int
    width: int
    window_center: float | None = None
    window_width: float | None = None
    resize: ResizeMode = ResizeMode.RESIZE
    mean: float = 0.0
    std: float = 1.0
    context_slices: int = 0
    context_spacing_mm: float | None = None

    @property
    def channels(self) -> int:
        """Input channels of the model: ``2 * context_slices + 1``."""
        return 2 * self.context_slices + 1

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ConfigError(f"preprocess: height/width must be positive, got "
                              f"{self.height}x{self.width}")
        if (self.window_center is None) != (self.window_width is None):
            raise ConfigError("preprocess: window_center and window_width go together")
        if self.window_width is not None and self.window_width <= 0:
            raise ConfigError(f"preprocess: window_width must be > 0, got {self.window_width}")
        if self.std <= 0:
            raise ConfigError(f"preprocess: std must be > 0, got {self.std}")
        if isinstance(self.context_slices, bool) or not isinstance(self.context_slices, int) \
                or not 0 <= self.context_slices <= MAX_CONTEXT_SLICES:
            raise ConfigError(f"preprocess.context_slices: an integer from 0 to "
                              f"{MAX_CONTEXT_SLICES}, got {self.context_slices!r}")
        spacing = self.context_spacing_mm
        if spacing is not None and (isinstance(spacing, bool)
                                    or not isinstance(spacing, (int, float))
                                    or not 0 < spacing < 1000 or not self.context_slices):
            raise ConfigError(f"preprocess.context_spacing_mm: a distance in mm > 0, with "
                              f"context_slices > 0, got {spacing!r}")
        if spacing is not None:
            object.__setattr__(self, "context_spacing_mm", float(spacing))
        object.__setattr__(self, "resize", ResizeMode(self.resize))

    def single_slice(self) -> PreprocessSpec:
        """The same recipe for one slice alone (no context): what each channel of a 2.5D
        input is made with."""
        return replace(self, context_slices=0, context_spacing_mm=None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["resize"] = self.resize.value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """Build from a sidecar mapping. Raises ConfigError naming an unknown or bad key."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"preprocess: unknown key(s) {sorted(unknown)}")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"preprocess: {exc}") from exc


def to_modality_units(stored: np.ndarray, meta: PixelMeta) -> np.ndarray:
    """Apply the linear modality LUT: ``stored * slope + intercept`` as float32."""
    out = stored.astype(np.float32, copy=True)
    if meta.rescale_slope != 1.0:
        out *= np.float32(meta.rescale_slope)
    if meta.rescale_intercept != 0.0:
        out += np.float32(meta.rescale_intercept)
    return out


def apply_window(values: np.ndarray, center: float | None, width: float | None) -> np.ndarray:
    """Map values to [0, 1] through a linear window, or min-max when no window is given."""
    if center is None or width is None:
        lo, hi = float(values.min()), float(values.max())
    else:
        lo, hi = center - width / 2.0, center + width / 2.0
    scale = 1.0 / max(hi - lo, 1e-6)
    return np.clip((values - np.float32(lo)) * np.float32(scale), 0.0, 1.0).astype(np.float32)


def fit_to_size(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize or letterbox a 2D float image to ``spec``'s size (area for shrink, linear else)."""
    h, w = image.shape
    if (h, w) == (spec.height, spec.width):
        return image
    if spec.resize is ResizeMode.RESIZE:
        interp = cv2.INTER_AREA if h > spec.height else cv2.INTER_LINEAR
        return cv2.resize(image, (spec.width, spec.height), interpolation=interp)
    scale = min(spec.height / h, spec.width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.full((spec.height, spec.width), float(resized.min()), dtype=np.float32)
    top, left = (spec.height - nh) // 2, (spec.width - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def preprocess_image(stored: np.ndarray, meta: PixelMeta, spec: PreprocessSpec) -> np.ndarray:
    """Turn one stored 2D frame into a model input of shape (1, H, W), float32.

    Raises:
        ValueError: ``stored`` is not 2D.
    """
    if stored.ndim != 2:
        raise ValueError(f"preprocess: expected a 2D frame, got shape {stored.shape}")
    values = to_modality_units(stored, meta)
    if meta.photometric_interpretation == "MONOCHROME1":
        values = values.max() + values.min() - values
    windowed = apply_window(values, spec.window_center, spec.window_width)
    fitted = fit_to_size(windowed, spec)
    normalised = (fitted - np.float32(spec.mean)) / np.float32(spec.std)
    return normalised[np.newaxis].astype(np.float32, copy=False)


def restore_geometry(mask: np.ndarray, original_shape: tuple[int, int],
                     spec: PreprocessSpec) -> np.ndarray:
    """Map a label mask (H, W) at model size back to the original frame size (nearest)."""
    h, w = original_shape
    if spec.resize is ResizeMode.RESIZE:
        return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    scale = min(spec.height / h, spec.width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (spec.height - nh) // 2, (spec.width - nw) // 2
    crop = mask[top:top + nh, left:left + nw].astype(np.uint8)
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_NEAREST)
