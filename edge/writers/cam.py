"""Class-activation maps as DICOM objects a PACS can show (see ``docs/explanations.md``).

- ``sc``: a Secondary Capture Image (PS3.3 A.8.1 via ``highdicom.sc.SCImage``), RGB, the
  heatmap (jet colour map, alpha = map value) burnt into the windowed source slice. Image Type
  ``DERIVED\\SECONDARY``, Derivation Description and Burned In Annotation ``YES`` say it is
  derived; a legend line is burnt into the top-left corner.
- ``pm``: a Parametric Map (PS3.3 A.75 via ``highdicom.pm.ParametricMap``), float values in
  [0, 1] on the source frame's grid with a Real World Value Mapping (unitless, "1").

Both take the CAM at the model's input size and map it back to the source frame with the
inverse of the preprocessing's resize (:func:`edge.preprocess.imaging.restore_geometry`'s
continuous counterpart).
"""

from __future__ import annotations

import enum

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from edge.core.types import ModelId
from edge.preprocess.dicom_pixels import decode
from edge.preprocess.imaging import PreprocessSpec, ResizeMode, apply_window, to_modality_units
from edge.writers.codes import AlgorithmInfo
from edge.writers.uids import result_uid

LEGEND = "AI CAM (derived, not for diagnosis)"


class CamOutput(str, enum.Enum):
    """``pipeline.cam_output``: which object carries the heatmap."""

    SC = "sc"
    PM = "pm"
    NONE = "none"


def cam_to_frame(cam: np.ndarray, shape: tuple[int, int], spec: PreprocessSpec) -> np.ndarray:
    """A CAM (H, W) at model input size -> the source frame's (rows, columns), float32 [0, 1].

    Raises:
        ValueError: ``cam`` is not 2D.
    """
    cam = np.asarray(cam, np.float32)
    if cam.ndim != 2:
        raise ValueError(f"CAM must be 2D, got shape {cam.shape}")
    rows, cols = shape
    if spec.resize is ResizeMode.LETTERBOX and (rows, cols) != cam.shape:
        scale = min(spec.height / rows, spec.width / cols)
        nh, nw = max(1, round(rows * scale)), max(1, round(cols * scale))
        top, left = (spec.height - nh) // 2, (spec.width - nw) // 2
        cam = cam[top:top + nh, left:left + nw]
    out = cv2.resize(cam, (cols, rows), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0.0, 1.0)


def overlay_rgb(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.5,
                legend: str = LEGEND) -> np.ndarray:
    """RGB uint8 burn-in: ``gray`` in [0, 1] under the jet-coloured ``cam`` in [0, 1] (same
    shape), each pixel's opacity ``alpha * cam``; ``legend`` written top left."""
    base = np.repeat((np.clip(gray, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    a = (alpha * np.clip(cam, 0, 1))[..., None]
    out = (base * (1 - a) + heat * a).astype(np.uint8)
    scale = max(0.3, gray.shape[1] / 1400)
    cv2.putText(out, legend, (4, int(14 * scale / 0.37)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (255, 255, 255), 1, cv2.LINE_AA)
    return np.ascontiguousarray(out)


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """Patient Orientation (PS3.3 C.7.6.1.1.1) of the rows and columns from Image Orientation
    (Patient): the dominant LPS axis of each direction cosine; ("L", "P") for an axial slice."""
    iop = [float(v) for v in getattr(source, "ImageOrientationPatient", (1, 0, 0, 0, 1, 0))]
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def axis(v: list[float]) -> str:
        k = int(np.argmax(np.abs(v)))
        return letters[k][0 if v[k] > 0 else 1]
    return axis(iop[:3]), axis(iop[3:])


def _windowed(source: Dataset, spec: PreprocessSpec) -> np.ndarray:
    decoded = decode(source, str(source.SOPInstanceUID))
    hu = to_modality_units(decoded.frames[0], decoded.meta)
    if spec.window_center is None or spec.window_width is None:
        lo, hi = float(hu.min()), float(hu.max())
        return (hu - lo) / max(hi - lo, 1e-6)
    return apply_window(hu, spec.window_center, spec.window_width)


def build_cam_sc(source: Dataset, cam: np.ndarray, spec: PreprocessSpec, model: ModelId,
                 algorithm: AlgorithmInfo, probability: float, index: int = 0) -> Dataset:
    """The Secondary Capture overlay of one source slice (with pixel data).

    Raises:
        DataError: the source pixels cannot be decoded.
        ValueError: from highdicom, naming the attribute, for an unusable source header.
    """
    gray = _windowed(source, spec)
    heat = cam_to_frame(cam, gray.shape, spec)
    legend = f"{LEGEND} p={probability:.2f}"
    rgb = overlay_rgb(gray, heat, legend=legend)
    series = str(source.SeriesInstanceUID)
    spacing = getattr(source, "PixelSpacing", None)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT",
        patient_orientation=patient_orientation(source),
        series_instance_uid=result_uid(series, model, "cam-sc-series"), series_number=9102,
        sop_instance_uid=result_uid(series, model, "cam-sc", index), instance_number=index + 1,
        manufacturer=algorithm.manufacturer,
        pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
        transfer_syntax_uid="1.2.840.10008.1.2.1")
    sc.Laterality = ""  # General Series Type 2C: a chest is not a paired body part
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = f"AI heatmap (CAM) {model.name}"[:64]
    sc.DerivationDescription = (f"Class-activation map of {model.name} v{model.version} "
                                f"overlaid on the source slice; derived, not for diagnosis")[:1024]
    sc.SoftwareVersions = algorithm.software_versions()
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def build_cam_pm(source: Dataset, cam: np.ndarray, spec: PreprocessSpec, model: ModelId,
                 algorithm: AlgorithmInfo, index: int = 0) -> Dataset:
    """The Parametric Map of one source slice: the CAM in [0, 1] on its grid (float32).

    Raises:
        ValueError: from highdicom, naming the attribute, for an unusable source header.
    """
    rows, cols = int(source.Rows), int(source.Columns)
    heat = cam_to_frame(cam, (rows, cols), spec)[None]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="CAM", lut_explanation="class-activation map, 0 to 1",
        unit=codes.UCUM.NoUnits, value_range=(0.0, 1.0), slope=1.0, intercept=0.0)
    series = str(source.SeriesInstanceUID)
    pm = hd.pm.ParametricMap(
        source_images=[source], pixel_array=heat.astype(np.float32),
        series_instance_uid=result_uid(series, model, "cam-pm-series"), series_number=9103,
        sop_instance_uid=result_uid(series, model, "cam-pm", index), instance_number=index + 1,
        manufacturer=algorithm.manufacturer, manufacturer_model_name=model.name[:64],
        software_versions=algorithm.software_versions(), device_serial_number="0",
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5,
                                                          window_width=1.0)],
        content_label="CAM",
        content_description=f"CAM {model.name}"[:64])
    pm.SeriesDescription = f"AI heatmap (CAM) {model.name}"[:64]
    pm.Laterality = ""  # General Series Type 2C: a chest is not a paired body part
    return pm
