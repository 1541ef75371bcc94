"""`resnet-client`: classify images, stream a folder, show model info and health, and benchmark a server.

Bad input ends with one `error: ...` line and exit code 2; a failed RPC with `error: <CODE>: <message>` and 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

from resnet_serve.cli_util import fail
from resnet_serve.imaging import SUFFIXES

from .common import ChannelOptions, ClassifierError, Result, info_dict, target_string, text_table

TOKEN_ENV = "RESNET_CLIENT_TOKEN"
IMAGE_SUFFIXES = tuple(SUFFIXES)  # what the server accepts (and training reads)


class BadInput(Exception):
    """The user's input is wrong (exit 2), as opposed to the server refusing it (exit 1)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        sys.exit(fail(f"{message} (see {self.prog} --help)"))


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--target", default="localhost:50051",
                   help="host:port, dns:///host:port, or a comma list of addresses (round-robin)")
    g.add_argument("--timeout", type=float, default=None,
                   help="deadline in seconds of each unary call (default 30) or of a whole stream (default none)")
    g.add_argument("--top-k", type=int, default=0, help="classes per image (0: the server's default, 5)")
    g.add_argument("--tls-ca", type=Path, help="CA bundle (PEM): enables TLS")
    g.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS; needs --tls-key")
    g.add_argument("--tls-key", type=Path, help="client private key (PEM) for mutual TLS")
    g.add_argument("--tls-server-name", help="name to check in the server's certificate (when --target is an IP)")
    g.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"sends 'authorization: Bearer <token>' (default: ${TOKEN_ENV})")
    g.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return p


def build_parser() -> Parser:
    common = _common()
    p = Parser(prog="resnet-client", description="Client for a resnet-serve classifier.v1 server.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("classify", parents=[common], help="classify image files (one unary call each)")
    c.add_argument("images", nargs="+", type=Path, metavar="IMG")
    c.set_defaults(func=cmd_classify)
    s = sub.add_parser("stream", parents=[common], help="classify every image under DIR over one stream; with "
                       "class subfolders also the accuracy against the folder names")
    s.add_argument("dir", type=Path, metavar="DIR")
    s.add_argument("--window", type=int, default=32, help="images in flight at most (default 32)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    s.set_defaults(func=cmd_stream)
    i = sub.add_parser("info", parents=[common], help="what the server is serving")
    i.set_defaults(func=cmd_info)
    h = sub.add_parser("health", parents=[common], help="grpc.health.v1 status; exit 0 only when SERVING")
    h.add_argument("--service", default="", help="service name to check (default: the server as a whole)")
    h.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for SERVING")
    h.set_defaults(func=cmd_health)
    b = sub.add_parser("bench", parents=[common], help="load generator: closed-loop concurrency sweep or "
                       "open-loop Poisson rate; images/s and latency percentiles per step")
    b.add_argument("--mode", choices=("unary", "stream"), default="unary")
    b.add_argument("--input", choices=("raw", "jpeg"), default="raw",
                   help="raw uint8 tensors at the model's input size, or JPEG files of the same size")
    load = b.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="1", help="closed loop: comma list of in-flight requests (1,4,16)")
    load.add_argument("--rate", default=None, help="open loop: comma list of images/s (Poisson arrivals)")
    b.add_argument("--warmup", type=float, default=1.0, metavar="S", help="seconds of warm-up per step")
    b.add_argument("--duration", type=float, default=5.0, metavar="S", help="measured seconds per step")
    b.add_argument("--requests", type=int, default=0, metavar="N",
                   help="closed loop: measure exactly N requests per step instead of --duration seconds")
    b.add_argument("--streams", type=int, default=1, help="streams per process in --mode stream")
    b.add_argument("--processes", type=int, default=1, help="client processes sharing the load (for ceilings)")
    b.add_argument("--protocol", choices=("classifier", "oip"), default="classifier",
                   help="classifier.v1, or the Open Inference Protocol (KServe v2) through tritonclient.grpc.aio: "
                        "the same load against us or a Triton server (needs --model)")
    b.add_argument("--model", default="", help="model name for --protocol oip")
    b.set_defaults(func=cmd_bench)
    return p


def options_from(args: argparse.Namespace) -> ChannelOptions:
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise BadInput(f"--{name.replace('_', '-')} {path}: no such file")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise BadInput("--tls-cert and --tls-key go together")
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    return ChannelOptions(root_certificates=args.tls_ca, client_certificate=args.tls_cert,
                          client_key=args.tls_key, server_name=args.tls_server_name, metadata=metadata,
                          tls=bool(args.tls_ca or args.tls_cert or args.tls_server_name))


def _client(args: argparse.Namespace):
    from .sync import ClassifierClient

    if args.top_k < 0:
        raise BadInput("--top-k must be >= 0")
    if args.timeout is not None and args.timeout <= 0:
        raise BadInput("--timeout must be positive")
    try:
        target = target_string(args.target)
    except ValueError as e:
        raise BadInput(f"--target {args.target}: {e}") from e
    return ClassifierClient(target, options_from(args), timeout=30.0 if args.timeout is None else args.timeout)


def _emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


def _result_dict(r: Result) -> dict[str, Any]:
    return {"model_version": r.model_version,
            "predictions": [{"class_id": p.class_id, "label": p.label, "score": round(p.score, 6)}
                            for p in r.predictions]}


# --- commands --------------------------------------------------------------------------------------------------
def cmd_classify(args: argparse.Namespace) -> int:
    for path in args.images:
        if not path.is_file():
            raise BadInput(f"{path}: no such file")
    rows, doc = [("IMAGE", "CLASS", "LABEL", "SCORE")], []
    with _client(args) as client:
        for path in args.images:
            try:
                result = client.classify(path, args.top_k)
            except ClassifierError as e:
                raise ClassifierError(e.code, f"{path}: {e.message}") from e
            doc.append({"image": str(path), **_result_dict(result)})
            for rank, p in enumerate(result.predictions):
                rows.append((str(path) if rank == 0 else "", str(p.class_id), p.label, f"{p.score:.4f}"))
    _emit(args, doc, text_table(rows))
    return 0


def find_images(root: Path) -> list[Path]:
    """Every image file under root, recursively, in a stable order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_label(root: Path, path: Path) -> str | None:
    """The class subfolder an image sits in (its first folder under root), or None at the top level."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def cmd_stream(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if not args.dir.is_dir():
        raise BadInput(f"{args.dir}: not a directory")
    if args.window < 1:
        raise BadInput("--window must be at least 1")
    files = find_images(args.dir)
    if not files:
        raise BadInput(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {args.dir}")
    labels = [folder_label(args.dir, f) for f in files]
    results: dict[int, Result | ClassifierError] = {}
    with _client(args) as client:
        t0 = time.perf_counter()
        with tqdm(total=len(files), unit="img", file=sys.stderr, disable=args.no_progress) as bar:
            try:
                for item in client.stream(files, args.top_k, args.window, timeout=args.timeout):
                    results[int(item.request_id)] = item
                    bar.update()
            except OSError as e:  # a file vanished or is unreadable
                raise BadInput(str(e)) from e
        seconds = time.perf_counter() - t0
    errors = Counter(r.code.name for r in results.values() if isinstance(r, ClassifierError))
    summary: dict[str, Any] = {"images": len(files), "seconds": round(seconds, 4),
                               "images_per_s": round(len(files) / seconds, 2), "errors": dict(errors)}
    lines = [f"{len(files)} images in {seconds:.2f} s: {len(files) / seconds:.1f} images/s over one stream "
             f"(window {args.window}); errors: {', '.join(f'{k}={v}' for k, v in errors.items()) or 'none'}"]
    labelled = [(label, results[i]) for i, label in enumerate(labels) if label is not None]
    if labelled:
        top1, topk = _hits(labelled, 1), _hits(labelled, args.top_k or 5)
        summary["accuracy"] = {"labelled": len(labelled), "top1": round(top1 / len(labelled), 6),
                               "top1_correct": top1, "topk": round(topk / len(labelled), 6), "topk_correct": topk}
        lines.append(f"accuracy against folder names: top-1 {top1}/{len(labelled)} = {top1 / len(labelled):.2%}, "
                     f"top-k {topk}/{len(labelled)} = {topk / len(labelled):.2%}")
    summary["results"] = [{"image": str(f), **(_result_dict(r) if isinstance(r, Result) else
                                                {"error": {"code": r.code.name, "message": r.message}})}
                          for f, r in ((f, results[i]) for i, f in enumerate(files))]
    _emit(args, summary, "\n".join(lines))
    return 0


def _hits(labelled: list[tuple[str, Result | ClassifierError]], k: int) -> int:
    """How many images have their folder's class (by label or by class id) among their first k predictions."""
    return sum(isinstance(r, Result) and any(label in (p.label, str(p.class_id)) for p in r.predictions[:k])
               for label, r in labelled)


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = info_dict(client.model_info())
    width = max(map(len, info))
    _emit(args, info, "\n".join(f"{k.ljust(width)}  {v}" for k, v in info.items()))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.wait > 0:
            client.wait_until_ready(args.wait)
        status = client.health(args.service, timeout=30.0 if args.timeout is None else args.timeout)
    _emit(args, {"status": status}, status)
    return 0 if status == "SERVING" else 1


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"{flag} takes a comma list of numbers, not {text!r}") from None
    if not values or min(values) <= 0:
        raise BadInput(f"{flag} values must be positive")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    from . import loadgen

    rates = _numbers(args.rate, float, "--rate") if args.rate else []
    concurrency = [] if rates else _numbers(args.concurrency, int, "--concurrency")
    if args.duration <= 0 or args.warmup < 0:
        raise BadInput("--duration must be positive and --warmup non-negative")
    if args.streams < 1 or args.processes < 1:
        raise BadInput("--streams and --processes must be at least 1")
    if args.requests < 0 or (args.requests and rates):
        raise BadInput("--requests must be positive and goes with --concurrency, not --rate")
    if args.protocol == "oip" and not args.model:
        raise BadInput("--protocol oip needs --model NAME")
    with _client(args) as client:
        target = client.target
        info = client.model_info() if args.protocol == "classifier" else None
    if info is None:
        import asyncio

        from .oip_bench import model_facts

        model, input_hw = asyncio.run(model_facts(target, args.model, options_from(args)))
    else:
        model, input_hw = info_dict(info), (int(info.input_shape[1]), int(info.input_shape[2]))
    config = loadgen.LoadConfig(
        target=target, mode=args.mode, input=args.input, concurrency=concurrency, rates=rates,
        warmup_s=args.warmup, duration_s=args.duration, requests=args.requests, streams=args.streams,
        processes=args.processes,
        top_k=args.top_k, timeout_s=30.0 if args.timeout is None else args.timeout,
        input_hw=input_hw, options=options_from(args), protocol=args.protocol, model=args.model)
    if args.requests:
        print(f"bench: {len(config.steps())} step(s) of {args.warmup:g} s warm-up + {args.requests} requests",
              file=sys.stderr)
    else:
        total = len(config.steps()) * (args.warmup + args.duration)
        print(f"bench: {len(config.steps())} step(s) of {args.warmup:g} s warm-up + {args.duration:g} s, about "
              f"{total:.0f} s", file=sys.stderr)
    steps = loadgen.run(config)
    doc = {"target": target, "model": model, "protocol": args.protocol, "mode": args.mode, "input": args.input,
           "processes": args.processes, "steps": steps}
    _emit(args, doc, loadgen.format_table(steps))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BadInput as e:
        return fail(str(e))
    except ClassifierError as e:
        return fail(f"{e.code.name}: {e.message}", 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
