"""Declarative routing: a series' :class:`SeriesInfo` -> the pipelines that run on it.

With rules configured (``routing.rules``), each rule whose conditions all hold contributes a
:class:`Pipeline` (all matching rules, or only the first with ``first_match_only``). With no
rules, every model whose sidecar applicability accepts the series (modality, body part, SOP
class) runs, and results go to the default destinations (``pipeline.destinations``, i.e. the
``--destination`` flags). A series nothing applies to gets a :class:`Routing` with no pipelines
and a ``skipped`` reason that the orchestrator records in the ledger.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edge.core.config import RoutingRule, RoutingSettings, RuleConditions
from edge.repository.sidecar import Applicability
from edge.routing.series import SeriesInfo

#: The pipeline name used when sidecars decide (no rules configured).
AUTO_PIPELINE = "auto"


@dataclass(frozen=True)
class Pipeline:
    """Models to run on a series and what to do with their results."""

    name: str
    models: tuple[str, ...]
    outputs: tuple[str, ...] = ("seg", "sr")  # of "seg", "sr"
    destinations: tuple[str, ...] = ()  # AET@HOST:PORT
    priority: int = 0  # scheduler level (1 highest); 0: from the C-STORE Priority


@dataclass(frozen=True)
class Routing:
    """The decision for one series: pipelines to run, or why none runs."""

    series_instance_uid: str
    pipelines: tuple[Pipeline, ...]
    skipped: str = ""  # the reason when ``pipelines`` is empty

    @property
    def models(self) -> tuple[str, ...]:
        """Every model any pipeline runs, each once, in rule order."""
        return tuple(dict.fromkeys(m for p in self.pipelines for m in p.models))


def _one_of(value: str, allowed: Sequence[str]) -> bool:
    return not allowed or value.upper() in {a.strip().upper() for a in allowed}


def mismatch(info: SeriesInfo, when: RuleConditions) -> str:
    """The first condition ``info`` fails, as text ("" when every condition holds)."""
    if not _one_of(info.modality, when.modality):
        return f"Modality {info.modality or '(none)'} not in {list(when.modality)}"
    if not _one_of(info.body_part, when.body_part):
        return f"BodyPartExamined {info.body_part or '(none)'} not in {list(when.body_part)}"
    if when.sop_class_uid and info.sop_class_uid not in when.sop_class_uid:
        return f"SOPClassUID {info.sop_class_uid} not in {list(when.sop_class_uid)}"
    if when.series_description is not None and not re.search(
            when.series_description, info.series_description, re.IGNORECASE):
        return f"SeriesDescription does not match {when.series_description!r}"
    missing = [v for v in when.image_type_contains if v.upper() not in info.image_type]
    if missing:
        return f"ImageType lacks {missing}"
    thickness = info.slice_thickness
    low, high = when.slice_thickness_min, when.slice_thickness_max
    if (low is not None or high is not None) and thickness is None:
        return "no SliceThickness"
    if thickness is not None and ((low is not None and thickness < low)
                                  or (high is not None and thickness > high)):
        return f"SliceThickness {thickness:g} outside [{low}, {high}]"
    if when.orientation and info.orientation.value not in when.orientation:
        return f"orientation {info.orientation.value} not in {list(when.orientation)}"
    if when.calling_ae and info.calling_ae not in {a.strip() for a in when.calling_ae}:
        return f"calling AE {info.calling_ae!r} not in {list(when.calling_ae)}"
    return ""


def applies(info: SeriesInfo, applicability: Applicability) -> str:
    """Why a sidecar's applicability rejects ``info`` ("" when it applies; empty lists: any)."""
    return mismatch(info, RuleConditions(modality=applicability.modality,
                                         body_part=applicability.body_part,
                                         sop_class_uid=applicability.sop_class_uid))


def _from_rule(rule: RoutingRule, defaults: tuple[str, ...]) -> Pipeline:
    return Pipeline(name=rule.name, models=rule.models, outputs=tuple(rule.outputs),
                    destinations=rule.destinations or defaults, priority=rule.priority)


def route(info: SeriesInfo, settings: RoutingSettings,
          models: Mapping[str, Applicability | None],
          destinations: Sequence[str] = ()) -> Routing:
    """Decide which pipelines run on ``info``'s series.

    ``models`` maps each served model to its sidecar applicability (None: the model has no
    sidecar, so it is never chosen automatically; a rule may still name it).
    """
    defaults = tuple(destinations)
    if settings.rules:
        chosen: list[Pipeline] = []
        reasons: list[str] = []
        for rule in settings.rules:
            why = mismatch(info, rule.when)
            if why:
                reasons.append(f"{rule.name}: {why}")
                continue
            chosen.append(_from_rule(rule, defaults))
            if settings.first_match_only:
                break
        skipped = "" if chosen else "no routing rule matches (" + "; ".join(reasons) + ")"
        return Routing(info.series_instance_uid, tuple(chosen), skipped)

    names: list[str] = []
    reasons = []
    for name, applicability in sorted(models.items()):
        if applicability is None:
            reasons.append(f"{name}: no sidecar")
            continue
        why = applies(info, applicability)
        if why:
            reasons.append(f"{name}: {why}")
        else:
            names.append(name)
    if not names:
        detail = "; ".join(reasons) if reasons else "no models loaded"
        return Routing(info.series_instance_uid, (), f"no model applies ({detail})")
    return Routing(info.series_instance_uid,
                   (Pipeline(AUTO_PIPELINE, tuple(names), destinations=defaults),))
