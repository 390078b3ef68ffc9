"""``mededge models --repo REPO``: models, versions, precision and metrics from the sidecars.

A converted version also shows its accuracy gate (``report.gate``, written by ``mededge
convert``): the metric, FP32 -> converted value, the drop and the tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edge.core.errors import RepositoryError
from edge.repository.model_config import read_model_config
from edge.repository.publish import existing_versions
from edge.repository.sidecar import read_sidecar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="model repository folder")


def _gate_line(gate: dict[str, Any], conversion: dict[str, Any]) -> str:
    """``    gate passed (from v1): auc 0.9518 -> 0.9516 (drop +0.0002, tolerance 0.01) ...``."""
    verdict = "passed" if gate.get("passed") else "FAILED"
    source = conversion.get("source_version", "?")
    return (f"    gate {verdict} (from v{source}): {gate['metric']} "
            f"{float(gate['reference']):.4f} (FP32) -> "
            f"{float(gate['candidate']):.4f} (drop {float(gate['drop']):+.4f}, tolerance "
            f"{float(gate['tolerance']):g}), top-1 agreement "
            f"{float(gate.get('top1_agreement', float('nan'))):.4f}, "
            f"{gate.get('samples', '?')} samples")


def describe_repository(repo: Path) -> list[str]:
    """One line per model version (and one per model that cannot be read).

    Raises:
        RepositoryError: ``repo`` is not a folder.
    """
    if not repo.is_dir():
        raise RepositoryError(f"{repo}: not a folder")
    lines = []
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            config = read_model_config(model_dir)
            sidecar = read_sidecar(model_dir)
        except RepositoryError as exc:
            lines.append(f"{model_dir.name}: unreadable: {exc}")
            continue
        task = sidecar.task.value if sidecar else "-"
        versions = existing_versions(model_dir)
        if not versions:
            lines.append(f"{model_dir.name}  {config.platform or config.backend}  {task}  "
                         "(no versions)")
        for version in versions:
            record = sidecar.versions.get(version) if sidecar else None
            precision = record.precision if record else "-"
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(record.metrics.items())) \
                if record else ""
            lines.append(f"{model_dir.name}:{version}  {config.platform or config.backend}  "
                         f"{task}  {precision}  {metrics}".rstrip())
            gate = record.report.get("gate") if record else None
            if record is not None and isinstance(gate, dict) and "metric" in gate:
                lines.append(_gate_line(gate, record.report.get("conversion") or {}))
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        lines = describe_repository(args.repo)
    except RepositoryError as exc:
        print(f"mededge models: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines) if lines else f"{args.repo}: no models")
    return 0
