"""`make demo`: serve an exported model, classify the held-out digits through the real client, print accuracy,
latency and an excerpt of the server's metrics, then stop the server with SIGTERM (it must exit 0)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

from resnet_serve.client.sync import ClassifierClient
from resnet_serve.common.cli import DefaultsFormatter, add_verbose_flag, quiet_frameworks
from resnet_serve.common.modeldir import load_manifest, resolve_version_dir

EXCERPT = ("resnet_serve_requests_total", "resnet_serve_batch_size_sum", "resnet_serve_batch_size_count",
           "resnet_serve_batches_total", "resnet_serve_model_info", "resnet_serve_model_warmup_seconds")


def held_out_images(model_dir: Path, out: Path) -> list[Path]:
    """The digits the model never trained on (same seeded split as training), as PNG files under out/<label>/,
    written by `resnet-train --write-holdout` (the client imports nothing of training)."""
    size = load_manifest(resolve_version_dir(model_dir)).input_size[0]
    if not out.is_dir():
        r = subprocess.run([_script("resnet-train"), "--write-holdout", str(out), "--input-size", str(size)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"demo: writing the held-out digits failed:\n{r.stdout}{r.stderr}")
    return sorted(out.glob("*/*.png"))


def _script(name: str) -> str:
    """A console script of this install (the demo runs the whole system: resnet-train, resnet-serve)."""
    return str(Path(sys.executable).parent / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description=__doc__, formatter_class=DefaultsFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("models/digits"), help="exported model to serve")
    p.add_argument("--port", type=int, default=50051, help="gRPC port of the server it starts")
    p.add_argument("--metrics-port", type=int, default=8000, help="metrics port of the server it starts")
    p.add_argument("--images", type=Path, default=Path("runs/holdout"), help="where the held-out digits are written")
    p.add_argument("--min-accuracy", type=float, default=0.8, help="exit 1 below this held-out accuracy")
    add_verbose_flag(p)
    args = p.parse_args(argv)
    quiet_frameworks(args.verbose)

    images = held_out_images(args.model_dir, args.images)
    print(f"demo: {len(images)} held-out digit images under {args.images}", flush=True)
    server = subprocess.Popen([_script("resnet-serve"), "--model-dir", str(args.model_dir),
                               "--host", "127.0.0.1", "--port", str(args.port), "--metrics-port",
                               str(args.metrics_port), "--health-port", "-1",  # its health: through the client
                               *(["--verbose"] if args.verbose else [])],
                              stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(server.stdout.readline() or "{}")
        if not ports:
            print("demo: the server did not start", file=sys.stderr)
            return 1
        with ClassifierClient(f"127.0.0.1:{ports['port']}") as client:
            client.wait_until_ready(timeout=300)
            info = client.model_info()
            print(f"demo: serving {info.name} v{info.version} ({info.architecture}, {info.precision}, "
                  f"{info.device}, input {list(info.input_shape)})")
            t0 = time.perf_counter()
            results = client.classify_many(images, window=64)
            elapsed = time.perf_counter() - t0
            correct = sum(1 for path, r in zip(images, results, strict=True)
                          if not isinstance(r, Exception) and r.top1.label == path.parent.name)
            failed = sum(1 for r in results if isinstance(r, Exception))
            accuracy = correct / len(images)
            latencies = []
            for path in images[:50]:
                t = time.perf_counter()
                client.classify(path)
                latencies.append(1000 * (time.perf_counter() - t))
        print(f"demo: stream of {len(images)} images: {len(images) / elapsed:.0f} images/s, {failed} failed")
        print(f"demo: unary latency over 50 calls: p50 {statistics.median(latencies):.1f} ms, "
              f"max {max(latencies):.1f} ms")
        print(f"demo: held-out accuracy {accuracy:.4f} ({correct}/{len(images)})")
        text = urlopen(f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=10).read().decode()
        print("demo: metrics excerpt")
        for line in text.splitlines():
            if line.startswith(EXCERPT):
                print("  " + line)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
    print(f"demo: server drained and exited with code {code}")
    return 0 if code == 0 and accuracy >= args.min_accuracy and not failed else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
