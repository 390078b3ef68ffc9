"""The one command-line tool, ``mededge``: a thin dispatcher to per-command modules.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Only the module
of the command being run is imported, so ``mededge serve`` never imports torch and ``mededge
--help`` is instant. The CLI sits above every package; nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("trainer.synth.command", "make synthetic chest CT / DX studies with ground truth"),
    "train": ("trainer.command", "train a model and publish it into a model repository"),
    "export": ("trainer.export_command", "export a checkpoint to ONNX into a model repository"),
    "convert": ("converters.command", "optimise / FP16 / INT8 / TensorRT a published model"),
    "serve": ("edge.api.serve_command", "run the DICOM, gRPC and HTTP service"),
    "infer": ("edge.tools.infer_command", "send a DICOM file or .npy to a model over gRPC"),
    "bench": ("edge.tools.bench_command", "benchmarks that compare against a reference"),
    "models": ("edge.tools.models_command", "list a repository's models, versions, metrics"),
    "config": ("edge.tools.config_command", "check a configuration file"),
    "demo-dicom": ("edge.tools.demo_dicom", "push a study, show SEG + SR arriving at a PACS"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mededge", description="Scanner-side AI: DICOM in, inference, SEG/SR out.",
        epilog="commands:\n" + "\n".join(f"  {n:<9} {h}" for n, (_, h) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mededge`` console script; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    verbose = False
    while args_list and args_list[0] in ("-v", "--verbose"):
        verbose = True
        args_list.pop(0)
    if not args_list or args_list[0] in ("-h", "--help"):
        top.print_help()
        return 0 if args_list else 2
    command, rest = args_list[0], args_list[1:]
    if command not in COMMANDS:
        top.error(f"unknown command {command!r}")
    module_name, help_text = COMMANDS[command]
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mededge {command}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
