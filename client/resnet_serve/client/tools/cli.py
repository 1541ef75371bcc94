"""`resnet-client`: classify images, stream a folder, show model info and health, and benchmark a server.

Bad input ends with one `error: ...` line and exit code 2; a failed RPC with `error: <CODE>: <message>` and 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np

from resnet_serve.client.channel import ChannelOptions, target_string
from resnet_serve.client.errors import ClassifierError
from resnet_serve.client.results import Result
from resnet_serve.client.sync import ClassifierClient
from resnet_serve.common.cli import DefaultsFormatter, fail
from resnet_serve.common.imaging import SUFFIXES
from resnet_serve.protos import classifier_pb2 as pb

from .load_steps import MAX_BATCH

TOKEN_ENV = "RESNET_CLIENT_TOKEN"
MAX_INPUT_FILES = 64  # bench --input-data: the images are held in memory, serialised once


class BadInput(Exception):
    """The user's input is wrong (exit 2), as opposed to the server refusing it (exit 1)."""


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        sys.exit(fail(f"{message} (see {self.prog} --help)"))


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--target", default="localhost:50051",
                   help="host:port, dns:///host:port, or a comma list of addresses (round-robin)")
    g.add_argument("--timeout", type=float, default=None,
                   help="deadline in seconds of each unary call (default 30) or of a whole stream (default none)")
    g.add_argument("--top-k", type=int, default=0,
                   help="classes per image; 0 means 5 (the server's choice); capped at the model's class count")
    g.add_argument("--tls-ca", type=Path, help="CA bundle (PEM): enables TLS")
    g.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS; needs --tls-key")
    g.add_argument("--tls-key", type=Path, help="client private key (PEM) for mutual TLS")
    g.add_argument("--tls-server-name", help="name to check in the server's certificate (when --target is an IP)")
    g.add_argument("--token", default=None,
                   help=f"sends 'authorization: Bearer <token>' (default: ${TOKEN_ENV}, never shown)")
    g.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def build_parser() -> Parser:
    common = _common()
    p = Parser(prog="resnet-client", description="Client for a resnet-serve classifier.v1 server.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    c = sub.add_parser("classify", parents=[common], help="classify image files (one unary call each)",
                       description="Classify each file (a directory: the images in it). Every file gets its "
                       "result or its error; exit 0 when all succeeded, 1 when the server refused some, 2 when "
                       "some could not be read.")
    c.add_argument("images", nargs="+", type=Path, metavar="IMG", help="image files or directories")
    c.set_defaults(func=cmd_classify)
    s = sub.add_parser("stream", parents=[common], help="classify every image under DIR over one stream",
                       description="Classify every image under DIR over one stream: one line per file as its "
                       "answer arrives (JSON Lines with --json, the last line the summary), the files that failed "
                       "or were skipped named, and with class subfolders the accuracy against the folder names. "
                       f"Images: {', '.join(IMAGE_SUFFIXES)} ({', '.join(CLIENT_DECODED)} decoded by the client). "
                       "Exit 1 when any image failed.")
    s.add_argument("dir", type=Path, metavar="DIR", help="folder of images, searched recursively")
    s.add_argument("--window", type=int, default=32, help="images in flight at most")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is drawn on stderr only when stderr is a terminal)")
    s.set_defaults(func=cmd_stream)
    i = sub.add_parser("info", parents=[common], help="what the server is serving: model, labels, preprocessing")
    i.set_defaults(func=cmd_info)
    h = sub.add_parser("health", parents=[common], help="grpc.health.v1 status; exit 0 only when SERVING")
    h.add_argument("--service", default="", help="service name to check (default: the server as a whole)")
    h.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for SERVING")
    h.set_defaults(func=cmd_health)
    b = sub.add_parser("bench", parents=[common], help="load generator: closed-loop concurrency sweep or "
                       "open-loop Poisson rate; images/s and latency percentiles per step")
    b.add_argument("--mode", choices=("unary", "stream"), default="unary",
                   help="one unary call per image, or items over bidirectional streams")
    b.add_argument("--input", choices=("raw", "jpeg"), default=None,
                   help="raw: uint8 tensors at the model's input size; jpeg: encoded files (default: raw, or "
                        "jpeg with --input-data)")
    b.add_argument("--input-data", type=Path, default=None, metavar="DIR",
                   help=f"send the images in DIR (up to {MAX_INPUT_FILES}) instead of generated pictures: their "
                        "bytes as they are with --input jpeg, decoded and resized to the input size with raw")
    load = b.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="1",
                      help="closed loop: comma list of in-flight requests, one step each, e.g. 1,4,16")
    load.add_argument("--rate", default=None, help="open loop: comma list of images/s (Poisson arrivals of "
                      "requests at rate/--batch per second), one step each, e.g. 50,100")
    b.add_argument("--warmup", type=float, default=1.0, metavar="S", help="seconds of warm-up per step")
    b.add_argument("--duration", type=float, default=5.0, metavar="S", help="measured seconds per step")
    b.add_argument("--requests", type=int, default=0, metavar="N",
                   help="measure exactly N requests per step instead of --duration seconds (with --rate: N arrivals)")
    b.add_argument("--streams", type=int, default=1, help="streams per process in --mode stream")
    b.add_argument("--processes", type=int, default=1, help="client processes sharing the load (for ceilings)")
    b.add_argument("--protocol", choices=("classifier", "oip"), default="classifier",
                   help="classifier.v1, or the Open Inference Protocol (KServe v2) through tritonclient.grpc.aio: "
                        "the same load against us or a Triton server (needs --model)")
    b.add_argument("--model", default="", help="model name for --protocol oip")
    b.add_argument("--batch", type=int, default=1, metavar="N",
                   help=f"images per request, 1 to {MAX_BATCH}, N > 1 with --protocol oip only (UINT8 [N,H,W,3] "
                        "or BYTES [N,1] of N distinct pictures). A request of N images is one request in the counts "
                        "and latencies; images/s counts N per answer; --concurrency C keeps C requests (C*N images) "
                        "in flight; --rate R stays images/s (R/N requests/s). The server refuses N above its "
                        "max_batch_size")
    b.set_defaults(func=cmd_bench)
    return p


def options_from(args: argparse.Namespace) -> ChannelOptions:
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise BadInput(f"--{name.replace('_', '-')} {path}: no such file")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise BadInput("--tls-cert and --tls-key go together")
    token = args.token or os.environ.get(TOKEN_ENV)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return ChannelOptions(root_certificates=args.tls_ca, client_certificate=args.tls_cert,
                          client_key=args.tls_key, server_name=args.tls_server_name, metadata=metadata,
                          tls=bool(args.tls_ca or args.tls_cert or args.tls_server_name))


def _client(args: argparse.Namespace) -> ClassifierClient:
    if args.top_k < 0:
        raise BadInput("--top-k must be >= 0")
    if args.timeout is not None and args.timeout <= 0:
        raise BadInput("--timeout must be positive")
    try:
        target = target_string(args.target)
    except ValueError as e:
        raise BadInput(f"--target {args.target}: {e}") from e
    return ClassifierClient(target, options_from(args), timeout=30.0 if args.timeout is None else args.timeout)


def info_dict(info: pb.ModelInfo) -> dict:
    """GetModelInfo's answer as the JSON `info` prints."""
    return {"name": info.name, "version": info.version, "architecture": info.architecture,
            "input_shape": list(info.input_shape), "num_classes": info.num_classes, "precision": info.precision,
            "max_batch_size": info.max_batch_size, "device": info.device, "engine": info.engine,
            "mean": [round(x, 6) for x in info.mean], "std": [round(x, 6) for x in info.std],
            "labels": list(info.labels), "preprocessing": preprocessing_dict(info.preprocessing)}


def preprocessing_dict(p: pb.Preprocessing) -> dict:
    return {"resize": p.resize, "input_size": list(p.input_size), "color": p.color, "scale": round(p.scale, 8),
            "mean": [round(x, 6) for x in p.mean], "std": [round(x, 6) for x in p.std], "layout": p.layout,
            "formats": list(p.formats)}


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns for the CLI's tables (first row: the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


def _result_dict(r: Result) -> dict[str, Any]:
    return {"model_version": r.model_version,
            "predictions": [{"class_id": p.class_id, "label": p.label, "score": round(p.score, 6)}
                            for p in r.predictions]}


# --- files -----------------------------------------------------------------------------------------------------
SERVER_FORMATS = tuple(SUFFIXES)  # sent as they are: the server decodes these (resnet_serve.common.imaging)
CLIENT_DECODED = (".tif", ".tiff")  # decoded here (first frame, as the server would) and sent as uint8 pixels
IMAGE_SUFFIXES = SERVER_FORMATS + CLIENT_DECODED
# Errors that say nothing about the file at hand: classify stops at the first (after printing what it has).
SERVER_WIDE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
LOCAL_ERROR = "UNREADABLE"  # the code of a file the client could not read or decode (nothing was sent)


class LocalError(Exception):
    """A file the client could not read or decode: reported in its place, the others go on."""


def load_image(path: Path) -> bytes | np.ndarray:
    """A file as what the server accepts: its bytes, or for formats only the client decodes, RGB pixels."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LocalError(f"{path}: {e.strerror or e}") from None
    if path.suffix.lower() not in CLIENT_DECODED:
        return data
    from PIL import Image, UnidentifiedImageError

    from resnet_serve.common.imaging import to_rgb, upright

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(to_rgb(upright(img)), dtype=np.uint8)
    except UnidentifiedImageError:
        raise LocalError(f"{path}: not a {path.suffix.lstrip('.').upper()} image PIL can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise LocalError(f"{path}: cannot decode ({e})") from None


def find_images(root: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under root, recursively, in a stable order; hidden files are neither."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return ([p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
            [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES])


def folder_label(root: Path, path: Path) -> str | None:
    """The class subfolder an image sits in (its first folder under root), or None at the top level."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _error_dict(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


# --- commands --------------------------------------------------------------------------------------------------
def cmd_classify(args: argparse.Namespace) -> int:
    """Every file gets its result or its error; a directory stands for the images in it. Exit 0 when all were
    classified, 1 when the server refused some, 2 when some could not be read at all (missing, no images)."""
    entries: list[tuple[Path, str | None]] = []  # (file, why it cannot be sent) in the order given
    for path in args.images:
        if path.is_dir():
            images, _ = find_images(path)
            entries += [(p, None) for p in images] or [
                (path, f"{path}: a directory with no images ({', '.join(IMAGE_SUFFIXES)})")]
        else:
            entries.append((path, None if path.is_file() else f"{path}: no such file"))
    rows, doc, failed, unreadable = [("IMAGE", "CLASS", "LABEL", "SCORE")], [], 0, 0
    fatal: ClassifierError | None = None
    with _client(args) as client:
        for path, problem in entries:
            try:
                if problem:
                    raise LocalError(problem)
                result = client.classify(load_image(path), args.top_k)
            except LocalError as e:
                unreadable += 1
                print(f"error: {e}", file=sys.stderr)
                doc.append({"image": str(path), "error": _error_dict(LOCAL_ERROR, str(e))})
                continue
            except ClassifierError as e:
                if e.code in SERVER_WIDE:
                    fatal = e  # the server, not this file: every next file would fail the same way
                    break
                failed += 1
                print(f"error: {e.code.name}: {path}: {e.message}", file=sys.stderr)
                doc.append({"image": str(path), "error": _error_dict(e.code.name, e.message)})
                continue
            doc.append({"image": str(path), **_result_dict(result)})
            for rank, p in enumerate(result.predictions):
                rows.append((str(path) if rank == 0 else "", str(p.class_id), p.label, f"{p.score:.4f}"))
    if args.json or len(rows) > 1:
        _emit(args, doc, text_table(rows))
    if fatal is not None:
        raise fatal
    return 2 if unreadable else 1 if failed else 0


def cmd_stream(args: argparse.Namespace) -> int:
    """One line per file as its answer arrives (JSON Lines with --json), then a summary; exit 1 if any failed."""
    if not args.dir.is_dir():
        raise BadInput(f"{args.dir}: not a directory")
    if args.window < 1:
        raise BadInput("--window must be at least 1")
    files, skipped = find_images(args.dir)
    if not files:
        raise BadInput(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {args.dir}")
    out = StreamOutput(args, width=max(len(str(f)) for f in files))
    results: dict[str, Result | ClassifierError | LocalError] = {}
    local: list[tuple[str, LocalError]] = []  # files that failed to load, appended by the sending thread
    names: deque[str] = deque()  # the path of each image sent, consumed as its request's id

    def images() -> Iterator[bytes | np.ndarray]:
        for f in files:
            try:
                image = load_image(f)
            except LocalError as e:
                local.append((str(f), e))
                continue
            names.append(str(f))
            yield image

    with _client(args) as client, out.progress(len(files)) as bar:
        t0 = time.perf_counter()
        for item in client.stream(images(), args.top_k, args.window, timeout=args.timeout,
                                  ids=iter(names.popleft, None)):
            results[item.request_id] = item
            out.item(item.request_id, item)
            bar.update()
        seconds = time.perf_counter() - t0
        for name, error in local:
            results[name] = error
            out.item(name, error)
            bar.update()
    out.summary(_summary(args, files, skipped, results, seconds))
    return 1 if any(not isinstance(r, Result) for r in results.values()) else 0


def _summary(args: argparse.Namespace, files: list[Path], skipped: list[Path],
             results: dict[str, Result | ClassifierError | LocalError], seconds: float) -> dict[str, Any]:
    errors = Counter(r.code.name if isinstance(r, ClassifierError) else LOCAL_ERROR
                     for r in results.values() if not isinstance(r, Result))
    doc: dict[str, Any] = {"images": len(files), "ok": len(files) - sum(errors.values()), "seconds": round(seconds, 4),
                           "images_per_s": round(len(files) / seconds, 2) if seconds else None,
                           "errors": dict(errors), "window": args.window,
                           "failed": [name for name, r in results.items() if not isinstance(r, Result)],
                           "skipped": [str(p) for p in skipped]}
    labelled = [(label, results.get(str(f))) for f in files if (label := folder_label(args.dir, f)) is not None]
    if labelled:
        top1, topk = _hits(labelled, 1), _hits(labelled, args.top_k or 5)
        doc["accuracy"] = {"labelled": len(labelled), "top1": round(top1 / len(labelled), 6),
                           "top1_correct": top1, "topk": round(topk / len(labelled), 6), "topk_correct": topk}
    return doc


class StreamOutput:
    """Where `stream` writes: a table row or a JSON line per file on stdout, progress on stderr only when it is
    a terminal (a log file or a pipe gets no bar)."""

    def __init__(self, args: argparse.Namespace, width: int):
        self.json, self.width = args.json, width
        self.show_progress = not args.no_progress and sys.stderr.isatty()
        self.bar: Any = None
        if not self.json:
            self._print(f"{'IMAGE'.ljust(width)}  CLASS  {'LABEL':<12}  SCORE")

    @contextlib.contextmanager
    def progress(self, total: int) -> Iterator[Any]:
        from tqdm import tqdm

        with tqdm(total=total, unit="img", file=sys.stderr, disable=not self.show_progress) as bar:
            self.bar = bar
            yield bar
        self.bar = None

    def _print(self, line: str) -> None:
        if self.bar is not None and self.show_progress:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def item(self, name: str, item: Result | ClassifierError | LocalError) -> None:
        if isinstance(item, Result):
            doc = {"image": name, **_result_dict(item)}
            p = item.top1
            text = f"{name.ljust(self.width)}  {p.class_id:>5}  {p.label:<12}  {p.score:.4f}"
        elif isinstance(item, ClassifierError):
            doc = {"image": name, "error": _error_dict(item.code.name, item.message)}
            text = f"{name.ljust(self.width)}  error: {item.code.name}: {item.message}"
        else:
            doc = {"image": name, "error": _error_dict(LOCAL_ERROR, str(item))}
            text = f"{name.ljust(self.width)}  error: {LOCAL_ERROR}: {item}"
        self._print(json.dumps(doc) if self.json else text)

    def summary(self, doc: dict[str, Any]) -> None:
        if self.json:
            self._print(json.dumps({"summary": doc}))
            return
        errors = ", ".join(f"{k}={v}" for k, v in doc["errors"].items()) or "none"
        lines = [f"{doc['images']} images in {doc['seconds']:.2f} s: {doc['images_per_s'] or 0:.1f} images/s over "
                 f"one stream (window {doc['window']}); {doc['ok']} ok, errors: {errors}"]
        if doc["failed"]:
            lines.append(f"failed ({len(doc['failed'])}): {', '.join(doc['failed'])}")
        if doc["skipped"]:
            lines.append(f"skipped, not images ({len(doc['skipped'])}): {', '.join(doc['skipped'])}")
        if acc := doc.get("accuracy"):
            n = acc["labelled"]
            lines.append(f"accuracy against folder names: top-1 {acc['top1_correct']}/{n} = {acc['top1']:.2%}, "
                         f"top-k {acc['topk_correct']}/{n} = {acc['topk']:.2%}")
        for line in lines:
            self._print(line)


def _hits(labelled: list[tuple[str, Any]], k: int) -> int:
    """How many images have their folder's class (by label or by class id) among their first k predictions."""
    return sum(isinstance(r, Result) and any(label in (p.label, str(p.class_id)) for p in r.predictions[:k])
               for label, r in labelled)


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = info_dict(client.model_info())
    _emit(args, info, info_text(info))
    return 0


def info_text(info: dict[str, Any], max_labels: int = 20) -> str:
    """The model as aligned `key  value` lines; a long label list is shortened (--json has them all)."""
    lines = {k: v for k, v in info.items() if k not in ("labels", "preprocessing")}
    labels = info["labels"]
    shown = ", ".join(f"{i}={name}" for i, name in enumerate(labels[:max_labels]))
    lines["labels"] = shown + (f", ... ({len(labels)} in all; --json lists every one)"
                               if len(labels) > max_labels else "")
    p = info["preprocessing"]
    lines["preprocessing"] = (f"{p['resize']} to {'x'.join(map(str, p['input_size']))}; {p['color']} * "
                              f"{p['scale']:.6g}, minus mean, divided by std; {p['layout']} float32; decodes "
                              f"{', '.join(p['formats'])}")
    width = max(map(len, lines))
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines.items())


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


def read_input_data(root: Path) -> list[bytes]:
    """bench --input-data: the first MAX_INPUT_FILES images under root, as file bytes."""
    if not root.is_dir():
        raise BadInput(f"--input-data {root}: not a directory")
    files = [p for p in find_images(root)[0] if p.suffix.lower() in SERVER_FORMATS][:MAX_INPUT_FILES]
    if not files:
        raise BadInput(f"--input-data {root}: no images ({', '.join(SERVER_FORMATS)})")
    try:
        return [p.read_bytes() for p in files]
    except OSError as e:
        raise BadInput(f"--input-data: {e.filename}: {e.strerror}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from . import load_report, loadgen
    from .payloads import payloads

    rates = _numbers(args.rate, float, "--rate") if args.rate else []
    concurrency = [] if rates else _numbers(args.concurrency, int, "--concurrency")
    if args.duration <= 0 or args.warmup < 0:
        raise BadInput("--duration must be positive and --warmup non-negative")
    if args.streams < 1 or args.processes < 1:
        raise BadInput("--streams and --processes must be at least 1")
    if args.requests < 0:
        raise BadInput("--requests must be positive")
    if not 1 <= args.batch <= MAX_BATCH:
        raise BadInput(f"--batch must be between 1 and {MAX_BATCH}, not {args.batch}")
    if args.batch > 1 and args.protocol == "classifier":
        raise BadInput("--batch above 1 needs --protocol oip: classifier.v1 carries one image per message")
    if args.protocol == "oip" and not args.model:
        raise BadInput("--protocol oip needs --model NAME")
    data = read_input_data(args.input_data) if args.input_data is not None else []
    kind = args.input or ("jpeg" if data else "raw")
    with _client(args) as client:
        target = client.target
        info = client.model_info() if args.protocol == "classifier" else None
    if info is None:
        import asyncio

        from .oip_transport import model_facts

        model, input_hw = asyncio.run(model_facts(target, args.model, options_from(args)))
    else:
        model = {k: v for k, v in info_dict(info).items() if k != "labels"}  # (ImageNet: 1000 of them)
        input_hw = (int(info.input_shape[1]), int(info.input_shape[2]))
    config = loadgen.LoadConfig(
        target=target, mode=args.mode, input=kind, concurrency=concurrency, rates=rates,
        warmup_s=args.warmup, duration_s=args.duration, requests=args.requests, streams=args.streams,
        processes=args.processes,
        top_k=args.top_k, timeout_s=30.0 if args.timeout is None else args.timeout,
        input_hw=input_hw, options=options_from(args), protocol=args.protocol, model=args.model,
        input_data=tuple(data), batch=args.batch)
    if data and kind == "raw":
        try:  # decoded here once, so a bad file is one line now rather than a failure in every client process
            payloads(kind, input_hw, data=data)
        except (OSError, ValueError) as e:
            raise BadInput(f"--input-data {args.input_data}: an image cannot be decoded ({type(e).__name__})") from None
    source = f"{len(data)} image(s) from {args.input_data}" if data else "generated pictures"
    if args.batch > 1:
        source += f", {args.batch} per request"
    if args.requests:
        length = f"{args.requests} requests"
    else:
        length = f"{args.duration:g} s, about {len(config.steps()) * (args.warmup + args.duration):.0f} s"
    print(f"bench: {len(config.steps())} step(s) of {args.warmup:g} s warm-up + {length}; input {kind}, {source}",
          file=sys.stderr)
    # Each step's row as soon as it ends: on stdout for the table, on stderr beside --json's one document.
    rows = sys.stderr if args.json else sys.stdout
    print(load_report.format_header(), file=rows, flush=True)
    steps = loadgen.run(config, on_step=lambda step: print(load_report.format_row(step), file=rows, flush=True))
    if args.json:
        print(json.dumps({"target": target, "model": model, "protocol": args.protocol, "mode": args.mode,
                          "input": kind, "batch": args.batch, "input_data": str(args.input_data) if data else None,
                          "processes": args.processes, "steps": steps}, indent=2))
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
