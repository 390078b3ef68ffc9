"""``mededge models --repo REPO``: models, versions, precision and metrics from the sidecars."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge.core.errors import RepositoryError
from edge.repository.model_config import read_model_config
from edge.repository.publish import existing_versions
from edge.repository.sidecar import read_sidecar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="model repository folder")


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
    return lines


def run(args: argparse.Namespace) -> int:
    try:
        lines = describe_repository(args.repo)
    except RepositoryError as exc:
        print(f"mededge models: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines) if lines else f"{args.repo}: no models")
    return 0
