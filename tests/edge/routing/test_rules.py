"""Routing: table-driven rules and the sidecar fallback (pure functions)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edge.core.config import RoutingSettings, load_settings
from edge.core.errors import ConfigError
from edge.repository.sidecar import Applicability
from edge.routing.rules import AUTO_PIPELINE, route
from edge.routing.series import DimsePriority, Orientation, SeriesInfo, orientation_of

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def info(**overrides: object) -> SeriesInfo:
    base: dict[str, object] = dict(
        study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", modality="CT",
        body_part="CHEST", sop_class_uid=CT, series_description="Thorax 1.25 mm lung",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"), slice_thickness=1.25,
        orientation=Orientation.AXIAL, calling_ae="SCANNER1")
    base.update(overrides)
    return SeriesInfo(**base)  # type: ignore[arg-type]


def routing(*rules: dict[str, object], first_match_only: bool = False) -> RoutingSettings:
    return load_settings(overrides={"routing": {"rules": list(rules),
                                                "first_match_only": first_match_only}},
                         environ={}).routing


THIN_CHEST = {"name": "thin-chest", "models": ["lung_seg", "nodule_cls"],
              "when": {"modality": ["ct"], "body_part": ["CHEST"], "sop_class_uid": [CT],
                       "series_description": "lung|thorax", "image_type_contains": ["original"],
                       "slice_thickness_min": 0.5, "slice_thickness_max": 2.0,
                       "orientation": ["axial"], "calling_ae": ["SCANNER1"]},
              "destinations": ["PACS@127.0.0.1:104"], "priority": 1, "outputs": ["seg"]}


@pytest.mark.parametrize(("series", "matches", "why"), [
    (info(), True, ""),
    (info(modality="MR", sop_class_uid=MR), False, "Modality MR"),
    (info(body_part="HEAD"), False, "BodyPartExamined HEAD"),
    (info(sop_class_uid=MR), False, "SOPClassUID"),
    (info(series_description="Scout"), False, "SeriesDescription"),
    (info(image_type=("DERIVED", "SECONDARY")), False, "ImageType lacks ['original']"),
    (info(slice_thickness=5.0), False, "SliceThickness 5 outside"),
    (info(slice_thickness=0.3), False, "SliceThickness 0.3 outside"),
    (info(slice_thickness=None), False, "no SliceThickness"),
    (info(orientation=Orientation.CORONAL), False, "orientation coronal"),
    (info(calling_ae="OTHER"), False, "calling AE 'OTHER'"),
])
def test_rule_conditions(series: SeriesInfo, matches: bool, why: str) -> None:
    decision = route(series, routing(THIN_CHEST), {}, ("DEFAULT@h:1",))
    if matches:
        (pipeline,) = decision.pipelines
        assert pipeline.name == "thin-chest"
        assert pipeline.models == ("lung_seg", "nodule_cls")
        assert pipeline.destinations == ("PACS@127.0.0.1:104",)
        assert pipeline.outputs == ("seg",) and pipeline.priority == 1
    else:
        assert decision.pipelines == ()
        assert "no routing rule matches" in decision.skipped and why in decision.skipped


def test_all_matching_rules_run_unless_first_match_only() -> None:
    rules = ({"name": "a", "models": ["m1"], "when": {"modality": ["CT"]}},
             {"name": "b", "models": ["m2", "m1"]})
    both = route(info(), routing(*rules), {}, ("D@h:1",))
    assert [p.name for p in both.pipelines] == ["a", "b"]
    assert both.models == ("m1", "m2")
    assert both.pipelines[0].destinations == ("D@h:1",)  # default destinations
    first = route(info(), routing(*rules, first_match_only=True), {})
    assert [p.name for p in first.pipelines] == ["a"]


@pytest.mark.parametrize(("series", "models", "skipped"), [
    (info(), ("lung_seg", "nodule_cls"), ""),
    (info(body_part="ABDOMEN"), ("any_ct",), ""),
    (info(modality="MR", sop_class_uid=MR), (), "no model applies"),
])
def test_without_rules_sidecars_decide(series: SeriesInfo, models: tuple[str, ...],
                                       skipped: str) -> None:
    available = {
        "lung_seg": Applicability(modality=("CT",), body_part=("CHEST",)),
        "nodule_cls": Applicability(modality=("CT",), body_part=("CHEST",),
                                    sop_class_uid=(CT,)),
        "any_ct": Applicability(modality=("CT",), body_part=("ABDOMEN",)),
        "triton_only": None,
    }
    decision = route(series, RoutingSettings(), available, ("PACS@h:104",))
    assert decision.models == models
    if models:
        assert decision.pipelines[0].name == AUTO_PIPELINE
        assert decision.pipelines[0].destinations == ("PACS@h:104",)
    else:
        assert skipped in decision.skipped and "triton_only: no sidecar" in decision.skipped


def test_no_models_loaded_is_a_reason() -> None:
    assert "no models loaded" in route(info(), RoutingSettings(), {}).skipped


def test_bad_regex_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"routing.rules.0.when.series_description"):
        routing({"name": "x", "models": ["m"], "when": {"series_description": "(("}})


@pytest.mark.parametrize(("iop", "expected"), [
    (AXIAL, Orientation.AXIAL), (CORONAL, Orientation.CORONAL),
    (SAGITTAL, Orientation.SAGITTAL), ((0.0,) * 6, Orientation.UNKNOWN),
    (None, Orientation.UNKNOWN),
    ((1.0, 0.0, 0.0, 0.0, 0.94, -0.34), Orientation.AXIAL),  # 20 degree gantry tilt
])
def test_orientation(iop: tuple[float, ...] | None, expected: Orientation) -> None:
    assert orientation_of(iop) is expected


def test_series_info_from_header() -> None:
    header = SimpleNamespace(
        StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3", Modality="ct",
        BodyPartExamined="chest ", SOPClassUID=CT, SeriesDescription="Lung",
        ImageType=["ORIGINAL", "primary"], SliceThickness="1.25", ImageOrientationPatient=CORONAL,
        ImagesInAcquisition="40")
    got = SeriesInfo.from_header(header, calling_ae="SCANNER1 ", priority=1)
    assert (got.modality, got.body_part, got.image_type) == ("CT", "CHEST",
                                                             ("ORIGINAL", "PRIMARY"))
    assert got.slice_thickness == 1.25 and got.orientation is Orientation.CORONAL
    assert got.priority is DimsePriority.HIGH and got.calling_ae == "SCANNER1"
    assert got.images_in_acquisition == 40
    with pytest.raises(ValueError, match="SeriesInstanceUID"):
        SeriesInfo.from_header(SimpleNamespace(StudyInstanceUID="1.2"))
