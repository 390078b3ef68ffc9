"""``mededge serve``: run the DICOM listener, the pipeline, the gRPC and HTTP service.

Flags override the configuration file, which overrides the defaults (gRPC 8001, HTTP 8002).
Once listening, it prints one machine-readable line per port, e.g.
``mededge: grpc listening on 127.0.0.1:8001``, and with ``--ports-file`` also writes them as
JSON. SIGTERM or SIGINT drains in-flight requests and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from edge.core.config import Settings, load_settings
from edge.core.durable import write_atomically
from edge.core.errors import ConfigError, MededgeError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings file")
    parser.add_argument("--model-repository", type=Path, help="model repository folder")
    parser.add_argument("--data-dir", type=Path, help="where the service keeps its data")
    parser.add_argument("--bind", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default 8001; 0: ephemeral)")
    parser.add_argument("--http-port", type=int,
                        help="HTTP port for /metrics and /v2/health (default 8002; 0: ephemeral)")
    parser.add_argument("--ports-file", type=Path,
                        help="write the bound ports as JSON here once listening")
    dicom = parser.add_argument_group("DICOM")
    dicom.add_argument("--dicom-port", type=int, help="DICOM port (default 11112; 0: ephemeral)")
    dicom.add_argument("--ae-title", help="our AE title (default MEDEDGE)")
    dicom.add_argument("--destination", action="append", default=[], metavar="AET@HOST:PORT",
                       help="where results (SEG, SR) are sent; repeatable; replaces the "
                            "configuration's pipeline.destinations")
    dicom.add_argument("--no-dicom", action="store_true",
                       help="serve gRPC/HTTP only: no DICOM listener, no pipeline")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    server = {key: value for key, value in (
        ("model_repository", args.model_repository), ("data_dir", args.data_dir),
        ("bind", args.bind), ("grpc_port", args.grpc_port), ("http_port", args.http_port),
    ) if value is not None}
    dicom = {key: value for key, value in (("port", args.dicom_port),
                                            ("ae_title", args.ae_title)) if value is not None}
    out: dict[str, Any] = {"server": server}
    if dicom:
        out["dicom"] = dicom
    if args.destination:
        out["pipeline"] = {"destinations": list(args.destination)}
    return out


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (aet, host, port).

    Raises:
        ConfigError: not of that form; the message quotes it.
    """
    aet, at, address = text.partition("@")
    host, colon, port = address.rpartition(":")
    if not (at and colon and aet and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"--destination {text!r}: expected AET@HOST:PORT")
    return aet, host, int(port)


def build_settings(args: argparse.Namespace) -> Settings:
    """Settings from the file named by ``--config`` with the flags on top.

    Raises:
        ConfigError: the file or a flag is invalid; the message names the key.
    """
    for destination in args.destination:
        parse_destination(destination)
    return load_settings(args.config, _overrides(args))


def run(args: argparse.Namespace) -> int:
    try:
        settings = build_settings(args)
    except ConfigError as exc:
        print(f"mededge serve: {exc}", file=sys.stderr)
        return 2
    from edge.api.server import EdgeServer  # heavy imports only once the settings are valid

    try:
        server = EdgeServer(settings, dicom=not args.no_dicom)
    except ConfigError as exc:
        print(f"mededge serve: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        ports = server.start()
    except (MededgeError, OSError) as exc:
        print(f"mededge serve: {exc}", file=sys.stderr)
        server.stop(0)
        return 2
    # the file first: whoever waits for the printed lines may read it at once
    if args.ports_file is not None:
        write_atomically(args.ports_file, json.dumps(
            {"host": ports.host, "grpc": ports.grpc, "http": ports.http, "dicom": ports.dicom}))
    print(f"mededge: grpc listening on {ports.host}:{ports.grpc}", flush=True)
    print(f"mededge: http listening on {ports.host}:{ports.http}", flush=True)
    if ports.dicom is not None:
        print(f"mededge: dicom listening on {ports.host}:{ports.dicom}", flush=True)
    while not stop.wait(1.0):
        pass
    server.stop()
    print("mededge: stopped", flush=True)
    return 0
