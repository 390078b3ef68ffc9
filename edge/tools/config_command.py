"""``mededge config check FILE``: validate a settings file and print the effective settings
(defaults, the file and ``MEDEDGE_*`` environment overrides merged), as YAML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from edge.core.config import load_settings
from edge.core.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate FILE and print the effective settings")
    check.add_argument("file", type=Path)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        print(f"mededge config check: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# {args.file}: valid", file=sys.stderr)
    return 0
