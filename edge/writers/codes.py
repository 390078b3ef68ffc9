"""Coded concepts of result objects: segment coding, findings, algorithm identification.

- Segmented Property Category / Type (PS3.3 C.8.20.2, CID 7150 / CID 7151): lung is an
  "Anatomical Structure" (SCT 91723000) of type "Lung" (SCT 39607008); a nodule is a
  "Morphologically Abnormal Structure" (SCT 49755003) of type "Nodule" (SCT 27925004, in
  CID 7151) with anatomic region "Lung".
- Algorithm Family (CID 7162 "Surface Processing Algorithm Families"), e.g. "Artificial
  Intelligence" (DCM 123110).
- Units are UCUM (PS3.16 CID 82): "ml" for volumes, "1" for probabilities and counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import edge
from edge.core.errors import ConfigError

ML = Code("ml", "UCUM", "milliliter")
NO_UNITS = codes.UCUM.NoUnits  # ("1", UCUM, "no units")
VOLUME = codes.SCT.Volume  # (118565006, SCT)
PROBABILITY = codes.DCM.Probability  # (122157, DCM)
COUNT = codes.DCM.NumberOfSimilarFindings  # (111406, DCM) number of findings of the type
PRESENT = codes.SCT.Present  # (52101004, SCT)
ABSENT = codes.SCT.Absent  # (272519000, SCT)
CT_CHEST = Code("24627-2", "LN", "CT Chest")  # TID 1500 procedure reported (CID 100, extensible)

#: CID 7162 families by the name used in ``AlgorithmInfo.family``.
ALGORITHM_FAMILIES: Mapping[str, Code] = {
    "Artificial Intelligence": codes.DCM.ArtificialIntelligence,
    "Deformable Models": codes.DCM.DeformableModels,
    "Edge Detection": codes.DCM.EdgeDetection,
    "Histogram Analysis": codes.DCM.HistogramAnalysis,
    "Morphological Operations": codes.DCM.MorphologicalOperations,
    "Cluster Analysis": codes.DCM.ClusterAnalysis,
}


@dataclass(frozen=True)
class AlgorithmInfo:
    """Algorithm Identification (PS3.3 C.8.20.2 / 10.16; family from CID 7162)."""

    name: str
    version: str
    family: str = "Artificial Intelligence"
    manufacturer: str = "mededge"

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("AlgorithmInfo: name and version must not be empty")
        if self.family not in ALGORITHM_FAMILIES:
            raise ValueError(f"AlgorithmInfo.family {self.family!r} is not one of "
                             f"{sorted(ALGORITHM_FAMILIES)} (CID 7162)")

    @property
    def family_code(self) -> Code:
        return ALGORITHM_FAMILIES[self.family]

    def software_versions(self) -> str:
        """One Software Versions value (LO, <= 64 characters, no backslash)."""
        return f"mededge {edge.__version__}; {self.name} {self.version}"[:64].replace("\\", "/")

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        """The Segment Description's Segmentation Algorithm Identification Sequence."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name, family=self.family_code, version=self.version,
            source=self.manufacturer)

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification for SR measurement groups."""
        return hd.sr.AlgorithmIdentification(name=self.name, version=self.version)


@dataclass(frozen=True)
class SegmentCoding:
    """How one label is coded: category (CID 7150), type (CID 7151), anatomic region."""

    category: Code
    property_type: Code
    anatomic_region: Code | None = None
    display_color: tuple[int, int, int] = (128, 174, 128)  # sRGB


LUNG = SegmentCoding(codes.SCT.AnatomicalStructure, codes.SCT.Lung,
                     display_color=(128, 174, 255))
NODULE = SegmentCoding(codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule,
                       anatomic_region=codes.SCT.Lung, display_color=(255, 200, 0))

#: Label names (as in a model's sidecar, normalised) -> coding.
DEFAULT_CODINGS: Mapping[str, SegmentCoding] = {
    "lung": LUNG, "lungs": LUNG,
    "nodule": NODULE, "nodules": NODULE, "lung_nodule": NODULE, "pulmonary_nodule": NODULE,
}


def coding_for(label: str, extra: Mapping[str, SegmentCoding] | None = None) -> SegmentCoding:
    """The coding of a label name (case and '-'/' ' vs '_' ignored).

    Raises:
        ConfigError: the label has no coding; the message names it.
    """
    key = label.strip().lower().replace("-", "_").replace(" ", "_")
    table = {**DEFAULT_CODINGS, **(extra or {})}
    if key not in table:
        raise ConfigError(f"label {label!r} has no SNOMED CT coding; known: {sorted(table)}")
    return table[key]
