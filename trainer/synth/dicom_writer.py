"""Write a phantom as a CT Image Storage series and a DX (For Presentation) image with pydicom.

Every Type 1 and Type 2 attribute of the modules of the CT Image IOD (PS3.3 A.3) and the Digital
X-Ray Image IOD (PS3.3 A.26) is present, so ``dciodvfy`` reports no errors. Compression uses
pydicom's encoders: JPEG 2000 lossless (pylibjpeg-openjpeg), JPEG-LS lossless (pyjpegls) and RLE
lossless (pydicom's own), all bit-exact.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from scipy import ndimage

from trainer.synth.phantom import Phantom


@dataclass(frozen=True)
class StudyInfo:
    """Identity of one synthetic study: patient demographics, dates and UIDs."""

    study_id: str
    patient_name: str
    patient_id: str
    birth_date: str  # YYYYMMDD
    sex: str  # M | F
    age: str  # nnnY
    study_date: str
    study_time: str  # HHMMSS
    accession: str
    study_instance_uid: str
    frame_of_reference_uid: str
    uid_entropy: tuple[str, ...]  # seeds the series / instance UIDs

    def uid(self, *parts: str) -> str:
        """A deterministic ``2.25.`` UID from this study's entropy and ``parts``."""
        return deterministic_uid(*self.uid_entropy, *parts)


def deterministic_uid(*parts: str) -> str:
    """``2.25.<decimal of a name-based UUID>`` (PS3.5 B.2), at most 44 characters.

    pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and returns a
    random UUID, so the name-based (version 5) UUID is built here instead.
    """
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "/".join(parts)).int)


def _base(info: StudyInfo, sop_class: str, sop_uid: str, series_uid: str, modality: str,
          series_number: int, description: str) -> Dataset:
    """The Patient, General Study, General Series, General Equipment and SOP Common modules."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDEDGE_SYNTH1"
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = info.study_date
    ds.InstanceCreationTime = info.study_time
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.birth_date
    ds.PatientSex = info.sex
    ds.PatientAge = info.age
    ds.PatientIdentityRemoved = "NO"
    ds.StudyInstanceUID = info.study_instance_uid
    ds.StudyDate = info.study_date
    ds.StudyTime = info.study_time
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StudyID = info.study_id.replace("study-", "S")[:16]
    ds.AccessionNumber = info.accession
    ds.StudyDescription = "CT CHEST SYNTHETIC"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = info.study_date
    ds.SeriesTime = info.study_time
    ds.SeriesDescription = description
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "mededge synth"
    ds.ManufacturerModelName = "phantom"
    ds.InstitutionName = "Synthetic Hospital"
    ds.StationName = "SYNTH01"
    ds.SoftwareVersions = "1"
    ds.ContentDate = info.study_date
    ds.ContentTime = info.study_time
    ds.AcquisitionDate = info.study_date
    ds.AcquisitionTime = info.study_time
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def _pixel_module(ds: Dataset, rows: int, columns: int, bits_stored: int, signed: bool,
                  photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0


def _save(ds: Dataset, pixels: np.ndarray, path: Path, transfer_syntax: str) -> None:
    """Store ``pixels`` in ``ds`` (compressed if asked) and write ``path`` as a Part 10 file."""
    if transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds["PixelData"].VR = "OW"
    else:
        ds.compress(transfer_syntax, np.ascontiguousarray(pixels), generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(phantom: Phantom, info: StudyInfo, out_dir: Path, *, signed: bool,
                    transfer_syntax: str, slice_thickness: float) -> list[tuple[str, str]]:
    """Write one file per slice as ``out_dir/NNNN.dcm``.

    Signed series store HU directly (PixelRepresentation 1, intercept 0); unsigned series store
    HU + 1024 in 12 bits (PixelRepresentation 0, intercept -1024).

    Returns:
        (file name, SOP Instance UID) of each slice, in slice order.
    """
    g = phantom.geometry
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = info.uid("ct-series")
    x0 = -(g.columns - 1) / 2 * g.pixel_spacing
    y0 = -(g.rows - 1) / 2 * g.pixel_spacing
    written = []
    for i in range(g.slices):
        sop_uid = info.uid("ct", str(i))
        ds = _base(info, CTImageStorage, sop_uid, series_uid, "CT", 2, "Chest CT synthetic")
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = info.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        z = g.z0 + i * g.slice_spacing
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [round(g.pixel_spacing, 6), round(g.pixel_spacing, 6)]
        ds.SliceThickness = round(slice_thickness, 4)
        ds.SpacingBetweenSlices = round(g.slice_spacing, 4)
        ds.SliceLocation = round(z, 4)
        _pixel_module(ds, g.rows, g.columns, 16 if signed else 12, signed, "MONOCHROME2")
        ds.RescaleIntercept = 0 if signed else -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = [-600, 40]
        ds.WindowWidth = [1500, 400]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        ds.KVP = 120
        ds.XRayTubeCurrent = 200
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "STANDARD"
        ds.ReconstructionDiameter = round(g.columns * g.pixel_spacing, 2)
        ds.GantryDetectorTilt = 0
        ds.TableHeight = 150
        ds.RotationDirection = "CW"
        ds.ScanOptions = "HELICAL"
        hu = phantom.hu[i]
        pixels = hu if signed else np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
        name = f"{i:04d}.dcm"
        _save(ds, pixels, out_dir / name, transfer_syntax)
        written.append((name, sop_uid))
    return written


def projection(phantom: Phantom) -> tuple[np.ndarray, float]:
    """An AP radiograph of the phantom: 12-bit, bone bright, square pixels, head at the top.

    The line integral of attenuation along y (posterior) is resampled so rows and columns have
    the CT's pixel spacing, then mapped with a gentle gamma to 0..4095.
    Returns the image (uint16) and its pixel spacing (mm).
    """
    g = phantom.geometry
    mu = np.clip(phantom.hu.astype(np.float32) / 1000.0 + 1.0, 0.0, None)  # relative to water
    path = mu.sum(axis=1) * (0.02 * g.pixel_spacing)  # (z, x), water 0.2 / cm
    path = path[::-1]  # superior first
    # at least one row: a few thin slices at a coarse pixel size would otherwise zoom to none
    zoom = max(g.slice_spacing / g.pixel_spacing, 1.0 / path.shape[0])
    path = ndimage.zoom(path, (zoom, 1.0), order=1)
    top = float(np.percentile(path, 99.9)) or 1.0
    image = np.clip(path / top, 0.0, 1.0) ** 0.8 * 4095.0
    return np.rint(image).astype(np.uint16), g.pixel_spacing


def write_dx(phantom: Phantom, info: StudyInfo, out_dir: Path, *, monochrome1: bool,
             transfer_syntax: str) -> tuple[str, str, str, str]:
    """Write the projection radiograph as ``out_dir/0000.dcm`` (Digital X-Ray, For Presentation).

    MONOCHROME1 images are stored inverted (bone dark in stored values, bright when displayed).

    Returns:
        (file name, SOP Instance UID, Series Instance UID, transfer syntax used). Images too
        small for JPEG 2000 are written RLE lossless instead.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    image, spacing = projection(phantom)
    series_uid, sop_uid = info.uid("dx-series"), info.uid("dx", "0")
    ds = _base(info, DigitalXRayImageStorageForPresentation, sop_uid, series_uid, "DX", 3,
               "Chest AP synthetic")
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "U"
    ds.ViewPosition = "AP"
    ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thorax")]
    ds.ViewCodeSequence = [_code("399348003", "SCT", "antero-posterior")]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.KVP = 110
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.DistanceSourceToDetector = 1800
    ds.DistanceSourceToPatient = 1700
    ds.EstimatedRadiographicMagnificationFactor = round(1800 / 1700, 6)
    ds.PositionerType = "COLUMN"
    ds.AcquisitionContextSequence = []
    ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "isocentre"
    _pixel_module(ds, image.shape[0], image.shape[1], 12, False,
                  "MONOCHROME1" if monochrome1 else "MONOCHROME2")
    pixels = (4095 - image).astype(np.uint16) if monochrome1 else image
    if transfer_syntax == JPEG2000Lossless and min(pixels.shape) < 64:
        transfer_syntax = RLELossless  # openjpeg's default 6 resolution levels need >= 32 px
    _save(ds, pixels, out_dir / "0000.dcm", transfer_syntax)
    return "0000.dcm", sop_uid, series_uid, transfer_syntax


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item
