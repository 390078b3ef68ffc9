"""``mededge bench``: benchmarks that print ratios against a reference measured in the same run.

``mededge bench serve --work DIR``: serving overhead of mededge vs raw ONNX Runtime vs Triton.
``mededge bench dicom --work DIR``: durable DICOM receive vs storescp, Orthanc, bare pynetdicom.
``mededge bench convert --work DIR``: INT8 vs FP32 on this CPU (speed-up and metric drop).
``mededge bench ttr --work DIR`` (or ``bench dicom --ttr``): time from the last C-STORE response
to the SEG at the PACS, against the last slice's compute.
``mededge bench detect --repo REPO --model NAME``: detector throughput, raw ONNX Runtime vs via
the scheduler, and the sliding-window overhead over the raw tile compute.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    serve = sub.add_parser("serve", help="mededge vs raw ONNX Runtime vs Triton")
    serve.add_argument("--work", type=Path, default=Path("work/bench"),
                       help="folder for the models, the table and the JSON results")
    serve.add_argument("--models", default="resnet18,unet2d",
                       help="comma-separated: resnet18, unet2d, floor (ResNet-18's tensors "
                            "with next to no compute: the transport floor)")
    serve.add_argument("--clients", type=int, default=8, help="concurrent client processes")
    serve.add_argument("--batch", type=int, default=1, help="batch size of the throughput run")
    serve.add_argument("--seconds", type=float, default=8.0, help="length of each measurement")
    serve.add_argument("--threads", type=int, default=0,
                       help="ONNX Runtime intra-op threads for all systems (0: its default)")
    serve.add_argument("--rounds", type=int, default=3,
                       help="interleaved rounds (raw, mededge, Triton); medians reported")
    serve.add_argument("--no-triton", action="store_true", help="skip the Triton reference")
    serve.add_argument("--client", choices=("cpp", "python"), default="cpp",
                       help="load generator: C++ (built on first use; Python if it cannot be) "
                            "or Python client processes")
    serve.add_argument("--frontends", default="native",
                       help="mededge's gRPC front ends to measure, side by side: native "
                            "(the default), grpcio (grpc.native_frontend off), or both")
    serve.add_argument("--transports", default="unary,stream,shm,stream+shm",
                       help="comma-separated: unary (ModelInfer), stream (ModelStreamInfer), "
                            "shm (ModelInfer with tensors in system shared memory), stream+shm")
    dicom = sub.add_parser("dicom", help="DICOM receive: mededge vs storescp, Orthanc, pynetdicom")
    dicom.add_argument("--work", type=Path, default=Path("work/bench-dicom"),
                       help="folder for the images, the received files and the table")
    dicom.add_argument("--images", type=int, default=300, help="CT images per run")
    dicom.add_argument("--size", type=int, default=512, help="rows and columns of each image")
    dicom.add_argument("--rounds", type=int, default=3,
                       help="alternating rounds; medians reported")
    dicom.add_argument("--systems", default="storescp,orthanc,pynetdicom,mededge",
                       help="comma-separated: storescp, orthanc, pynetdicom, mededge")
    dicom.add_argument("--streams", default="1,4",
                       help="comma-separated numbers of parallel associations")
    dicom.add_argument("--ttr", action="store_true",
                       help="run the time-to-result bench instead (see `bench ttr`)")
    ttr = sub.add_parser("ttr", help="time to result: last C-STORE response -> SEG at the PACS")
    _ttr_arguments(ttr)
    _convert_arguments(sub.add_parser(
        "convert", help="INT8 vs FP32 on ONNX Runtime CPU: throughput ratio and metric drop"))
    detect = sub.add_parser("detect", help="detector: raw ORT vs scheduler, sliding window")
    detect.add_argument("--repo", type=Path, default=Path("work/models"))
    detect.add_argument("--model", default="nodule_det")
    detect.add_argument("--seconds", type=float, default=4.0, help="length of each measurement")
    detect.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians")
    detect.add_argument("--out", type=Path, help="write the results as JSON here")


def _ttr_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=Path("work/bench-ttr"),
                        help="folder for the models, the series, the table and the JSON")
    parser.add_argument("--series", type=int, default=10, help="series pushed (K)")
    parser.add_argument("--slices", type=int, default=100, help="slices per series")
    parser.add_argument("--size", type=int, default=512, help="rows and columns")
    parser.add_argument("--quiet-period", type=float, default=None,
                        help="pipeline.quiet_period_s of the service (default: its default)")


def run(args: argparse.Namespace) -> int:
    if args.bench == "ttr" or (args.bench == "dicom" and args.ttr):
        from edge.tools import bench_ttr

        work = args.work if args.bench == "ttr" else args.work / "ttr"
        series = getattr(args, "series", 10)
        slices = getattr(args, "slices", 100)
        return bench_ttr.main(work, series, slices, args.size,
                              getattr(args, "quiet_period", None))
    if args.bench == "dicom":
        return _run_dicom(args)
    if args.bench == "convert":
        return _run_convert(args)
    if args.bench == "detect":
        from edge.tools import bench_detect

        return bench_detect.main(args.repo, args.model, args.seconds, args.rounds, args.out)
    from edge.tools import bench_serve

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in bench_serve.MODELS]
    if unknown:
        print(f"mededge bench serve: unknown model(s) {unknown}; choose from "
              f"{sorted(bench_serve.MODELS)}")
        return 2
    transports = tuple(t.strip() for t in args.transports.split(",") if t.strip())
    if not transports or set(transports) - set(bench_serve.TRANSPORTS):
        print(f"mededge bench serve: --transports {args.transports!r}; choose from "
              f"{list(bench_serve.TRANSPORTS)}")
        return 2
    frontends = tuple(f.strip() for f in args.frontends.split(",") if f.strip())
    if not frontends or set(frontends) - set(bench_serve.FRONTENDS):
        print(f"mededge bench serve: --frontends {args.frontends!r}; choose from "
              f"{list(bench_serve.FRONTENDS)}")
        return 2
    return bench_serve.main(args.work, models, args.batch, args.clients, args.seconds,
                            args.threads, not args.no_triton, args.rounds, transports,
                            args.client, frontends)


def _run_dicom(args: argparse.Namespace) -> int:
    from edge.tools import bench_dicom

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in bench_dicom.SYSTEMS]
    if unknown or not systems:
        print(f"mededge bench dicom: unknown system(s) {unknown}; choose from "
              f"{list(bench_dicom.SYSTEMS)}")
        return 2
    streams = [int(n) for n in args.streams.split(",") if n.strip()]
    return bench_dicom.main(args.work, args.images, args.rounds, systems, streams, args.size)


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=Path("work/bench-convert"),
                        help="folder for the models, the INT8 files and the JSON results")
    parser.add_argument("--size", type=int, default=96, help="image size of the bench models")
    parser.add_argument("--steps", type=int, default=60, help="training steps per bench model")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds (FP32, INT8); medians reported")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    parser.add_argument("--repo", type=Path, help="bench published models instead")
    parser.add_argument("--classifier", help="classifier name in --repo")
    parser.add_argument("--segmenter", help="segmenter name in --repo")
    parser.add_argument("--detector", help="detector name in --repo (scored on map_50)")
    parser.add_argument("--data", type=Path, help="data for --repo models (train/test splits)")


def _run_convert(args: argparse.Namespace) -> int:
    # The converters package sits beside edge (it may import edge, not the reverse); this CLI
    # command only dispatches to it, lazily, as edge.cli dispatches to every command module.
    from converters import bench

    return bench.main(args.work, size=args.size, steps=args.steps, rounds=args.rounds,
                      seconds=args.seconds, batch=args.batch, threads=args.threads,
                      repo=args.repo, classifier=args.classifier, segmenter=args.segmenter,
                      data=args.data, detector=args.detector)
