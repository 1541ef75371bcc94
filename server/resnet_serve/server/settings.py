"""Server settings from defaults < config file (TOML or JSON) < environment (RESNET_SERVE_*) < command line.

The effective value of every setting, and where it came from, is logged once at start: settings that are
silently ignored cost users of other servers hours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .batcher import default_buckets
from .predictor_config import ENGINES, SIMULATED, check_normalise

ENV_PREFIX = "RESNET_SERVE_"
MAX_FRONT_PROCESSES = 32  # each worker serves every front's connection (worker.MAX_ATTACHED)


@dataclass
class Settings:
    model_dir: str = ""
    version: int | None = None
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 8000  # -1 disables /metrics; 0 picks a free port
    metrics_host: str = ""  # where /metrics, /healthz, /readyz listen; empty = the gRPC host
    # grpc.health.v1 alone, answered off the event loop (server/resnet_serve/server/health_port.py), for probes
    # that must not wait behind a burst of large requests. On by default, at a fixed port like the gRPC and
    # metrics ports, so probes and HEALTHCHECKs can name it; -1 turns it off; 0 picks a free port.
    health_port: int = 50052
    health_host: str = ""  # where the health port listens; empty = the gRPC host
    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    max_queue_size: int = 256
    buckets: str = ""  # comma-separated batch sizes to warm and run; empty = powers of two up to max_batch_size
    instances: int = 1
    threads_per_instance: int = 2
    # asyncio gRPC fronts on the one port (SO_REUSEPORT) sharing the workers; > 1 serves one version (no hot
    # reload). docs/architecture.md, "Front processes".
    front_processes: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    engine: str = "paddle"
    simulated_cost_ms: str = ""  # "A,C": engine simulated (benchmarks only) takes A + C*b ms per batch of b
    normalise: str = "auto"  # where pixels are normalised: auto | graph | worker (predictor_config.program_served)
    trt_cache_dir: str = ""
    gpus: str = ""  # comma-separated GPU ids for --device gpu: worker i runs on gpus[i % n]; empty = GPU 0
    # How long one worker may take to load, convert (TensorRT) and warm before the start fails. Keep it below the
    # startup probe's window (deploy/k8s, Dockerfile HEALTHCHECK --start-period), so a slow start fails with
    # this message rather than a probe kill.
    worker_start_timeout_s: float = 300.0
    preprocess_threads: int = 2
    max_message_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 16_777_216  # pixels decoded per image (a JPEG's after its reduced-scale decode)
    max_aspect_ratio: float = 100.0  # longer side / shorter side of an image
    max_preprocess_queue: int = 64  # images waiting for or in a preprocess thread; beyond: RESOURCE_EXHAUSTED
    max_preprocess_queue_bytes: int = 32 * 1024 * 1024  # ... and the payload bytes they hold
    max_request_id_length: int = 1024  # characters of a request_id / OIP id, echoed in every answer
    max_stream_in_flight: int = 128
    grace_period_s: float = 30.0
    max_concurrent_streams: int = 1000  # per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)
    # > 0: close each client connection after this long (with a grace for calls in progress), so clients that
    # balance over DNS (dns:///, headless Service) re-resolve and find replicas added by a scale-up.
    max_connection_age_s: float = 0.0
    tls_cert: str = ""  # PEM; with tls_key, serve TLS only
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA bundle: require client certificates signed by it (mutual TLS)
    auth_token_file: str = ""  # one bearer token per line (also RESNET_SERVE_AUTH_TOKENS); never logged
    auth_exempt_health: bool = True  # health checks and reflection without a token (probes, load balancers)
    poll_interval_s: float = 0.0  # > 0: look for a newer model version this often and switch to it
    unhealthy_after_failures: int = 5  # consecutive failed batches that turn health NOT_SERVING
    # A worker holding one batch longer than this is killed and replaced (its requests get UNAVAILABLE).
    # 0: derived from the warm-up, 10 x the time to warm every bucket and at least 30 s.
    batch_time_limit_s: float = 0.0
    # Batches each worker holds: 2 = while one computes, the next is written into its other shared-memory slot
    # (server/resnet_serve/server/worker_pool.py); 1 = one at a time (the next batch keeps filling meanwhile).
    batches_in_flight: int = 2
    verbose: bool = False  # -v: Paddle's own log lines and warnings too (framework chatter is hidden by default)
    sources: dict[str, str] = field(default_factory=dict, repr=False)

    def bucket_sizes(self) -> tuple[int, ...]:
        if self.buckets.strip():
            return tuple(sorted({int(b) for b in self.buckets.split(",") if b.strip()}))
        return default_buckets(self.max_batch_size)

    def gpu_ids(self) -> tuple[int, ...]:
        try:
            ids = tuple(int(g) for g in self.gpus.split(",") if g.strip())
        except ValueError:
            raise ValueError(f"gpus must be comma-separated GPU ids like 0,1, not {self.gpus!r}") from None
        if any(g < 0 for g in ids):
            raise ValueError(f"gpus must be GPU ids >= 0, not {self.gpus!r}")
        return ids

    def simulated_cost(self) -> tuple[float, float]:
        """(a, c) ms of the simulated engine; (0, 0) when unset (server/resnet_serve/server/simulated_engine.py)."""
        from .simulated_engine import parse_cost_ms

        return parse_cost_ms(self.simulated_cost_ms) if self.simulated_cost_ms.strip() else (0.0, 0.0)

    def validate(self) -> None:
        if not self.model_dir:
            raise ValueError("--model-dir is required (or RESNET_SERVE_MODEL_DIR, or model_dir in the config file)")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu, not {self.device!r}")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ValueError(f"precision must be fp32, fp16 or int8, not {self.precision!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be onednn or openvino (CPU), tensorrt or cuda (GPU), simulated "
                             f"(benchmarks), or paddle (the default: oneDNN on CPU, TensorRT on GPU), "
                             f"not {self.engine!r}")
        check_normalise(self.normalise)
        if self.simulated_cost_ms.strip() and self.engine != SIMULATED:
            raise ValueError("simulated_cost_ms is for --engine simulated (benchmarks only)")
        self.simulated_cost()
        if self.engine == SIMULATED and self.device != "cpu":
            raise ValueError("engine simulated runs on --device cpu (it stands for any device)")
        if self.precision == "int8" and self.device == "gpu":
            raise ValueError("int8 runs on CPU only: int8 exports are oneDNN programs that no GPU engine runs; "
                             "use --device cpu, or --precision fp16 on GPU")
        if self.engine in ("tensorrt", "cuda") and self.device != "gpu":
            raise ValueError(f"engine {self.engine} runs on GPU only: add --device gpu")
        if self.engine in ("onednn", "openvino") and self.device == "gpu":
            raise ValueError(f"engine {self.engine} runs on CPU only; on GPU use tensorrt (default) or cuda")
        if self.worker_start_timeout_s <= 0:
            raise ValueError("worker_start_timeout_s must be > 0")
        self.gpu_ids()
        if self.precision == "fp16" and self.device != "gpu":
            raise ValueError("precision fp16 needs --device gpu (TensorRT); CPU serves fp32 or int8")
        for name in ("max_batch_size", "max_queue_size", "instances", "threads_per_instance", "preprocess_threads",
                     "max_stream_in_flight", "max_preprocess_queue", "max_preprocess_queue_bytes",
                     "max_request_id_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535 (0: a free one), not {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535 (0: a free one, -1: off), not {self.metrics_port}")
        if not -1 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be 0..65535 (0: a free one, -1: off), not {self.health_port}")
        if not 1 <= self.front_processes <= MAX_FRONT_PROCESSES:
            raise ValueError(f"front_processes must be 1..{MAX_FRONT_PROCESSES}, not {self.front_processes}")
        if self.front_processes > 1 and self.poll_interval_s > 0:
            raise ValueError("front_processes > 1 serves one version: hot reload (poll_interval_s) is not "
                             "available with it; restart the server (roll the pods) to serve a new version")
        if self.batches_in_flight not in (1, 2):
            raise ValueError(f"batches_in_flight must be 1 or 2, not {self.batches_in_flight}")
        if self.batch_time_limit_s < 0:
            raise ValueError("batch_time_limit_s must be >= 0 (0: derived from the warm-up)")
        if not self.max_aspect_ratio >= 1:
            raise ValueError("max_aspect_ratio must be at least 1")
        if self.max_queue_delay_us < 0:
            raise ValueError("max_queue_delay_us must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        sizes = self.bucket_sizes()
        if sizes[0] != 1 or sizes[-1] != self.max_batch_size:
            raise ValueError(f"buckets {list(sizes)} must include 1 and max_batch_size {self.max_batch_size}")

    def describe(self) -> str:
        """One line per setting: name = value (source)."""
        return "\n".join(f"  {f.name} = {getattr(self, f.name)!r} ({self.sources.get(f.name, 'default')})"
                         for f in fields(self) if f.name != "sources")


FIELDS = {f.name: f for f in fields(Settings) if f.name != "sources"}


def _coerce(name: str, value: Any) -> Any:
    default = getattr(Settings, name, None)
    if value is None or value == "":
        return None if name == "version" else value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if name == "version" or isinstance(default, int) and not isinstance(default, bool):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return str(value)


def read_config_file(path: Path) -> dict[str, Any]:
    text = Path(path).read_text()
    if Path(path).suffix == ".json":
        data = json.loads(text)
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        data = tomllib.loads(text)
        data = data.get("server", data)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    return data


HELP = {
    "model_dir": "models/<name> (serves the highest version) or a version folder",
    "version": "pin this version number instead of the highest",
    "host": "gRPC listen address; 0.0.0.0 = every interface (logs a WARNING without auth), 127.0.0.1 = loopback",
    "port": "gRPC port; 0 picks a free one",
    "metrics_port": "HTTP port of /metrics, /healthz, /readyz; -1 disables it, 0 picks a free one",
    "metrics_host": "listen address of the metrics port",
    "health_port": "gRPC port serving grpc.health.v1 only, answered off the event loop (for probes); -1 "
                   "disables it, 0 picks a free one",
    "health_host": "listen address of the health port",
    "max_batch_size": "largest batch sent to a predictor",
    "max_queue_delay_us": "how long the oldest queued request may wait for its batch to fill",
    "max_queue_size": "queued requests beyond which new ones get RESOURCE_EXHAUSTED",
    "buckets": "batch sizes to warm and run, e.g. 1,2,4,8",
    "instances": "engine worker processes (one predictor each)",
    "threads_per_instance": "CPU math threads of each predictor",
    "front_processes": "asyncio gRPC front processes sharing the port (SO_REUSEPORT) and the workers, e.g. one "
                       "per core a GPU's traffic needs; > 1 turns hot reload off",
    "device": "cpu | gpu",
    "precision": "fp32 | int8 (int8 exports run int8 anyway) | fp16 (GPU)",
    "engine": "paddle (as the manifest says on CPU, tensorrt on GPU) | onednn | openvino (CPU, fp32 legacy "
              "exports) | tensorrt | cuda (GPU, no TensorRT) | simulated (benchmarks only: no model runs, see "
              "--simulated-cost-ms)",
    "simulated_cost_ms": "A,C: with --engine simulated (for benchmarks only, never for serving), a batch of b "
                         "images takes A + C*b ms and is answered from its pixels, e.g. 5,0.1",
    "normalise": "where uint8 pixels are normalised: auto (the worker, in numpy, on CPU; the exported program on "
                 "GPU) | graph (the exported program) | worker",
    "trt_cache_dir": "where TensorRT engines are cached (GPU)",
    "gpus": "GPU ids for --device gpu, e.g. 0,1: worker i runs on gpus[i % n]",
    "worker_start_timeout_s": "seconds one worker may take to load, build TensorRT engines and warm",
    "preprocess_threads": "threads decoding and resizing images",
    "max_message_bytes": "largest gRPC message accepted or sent",
    "batch_time_limit_s": "kill and replace a worker holding one batch longer than this (its requests: "
                          "UNAVAILABLE)",
    "batches_in_flight": "batches each worker holds: 2 = the next is written while one computes, 1 = one at a "
                         "time",
    "max_pixels": "pixels decoded per image (a JPEG's after reduced-scale decoding); beyond: INVALID_ARGUMENT",
    "max_aspect_ratio": "longer / shorter side of an image; beyond: INVALID_ARGUMENT",
    "max_preprocess_queue": "images waiting for or in a preprocess thread; beyond: RESOURCE_EXHAUSTED",
    "max_preprocess_queue_bytes": "payload bytes of those images; beyond: RESOURCE_EXHAUSTED",
    "max_request_id_length": "characters of a request id (echoed in every answer)",
    "max_stream_in_flight": "items of one stream being processed at once",
    "grace_period_s": "on SIGTERM, how long calls in progress may take to finish",
    "max_concurrent_streams": "concurrent calls per client connection (HTTP/2)",
    "max_connection_age_s": "> 0: close client connections after this long, so DNS-balanced clients re-resolve",
    "tls_cert": "PEM certificate chain: serve TLS only (with --tls-key)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle: require client certificates signed by it (mutual TLS)",
    "auth_token_file": "file of bearer tokens, one per line (or RESNET_SERVE_AUTH_TOKENS); never logged",
    "auth_exempt_health": "health checks and reflection need no token (probes, load balancers)",
    "poll_interval_s": "> 0: look for a newer model version this often and switch to it",
    "unhealthy_after_failures": "consecutive failed batches that turn health NOT_SERVING",
}
# What an empty or None default means, in --help.
EMPTY_DEFAULT = {"version": "the highest", "metrics_host": "the --host", "health_host": "the --host",
                 "buckets": "powers of two up to --max-batch-size", "trt_cache_dir": "<version folder>/_opt_cache",
                 "model_dir": "none, required", "gpus": "GPU 0", "simulated_cost_ms": "0,0"}


def _help(name: str) -> str:
    default = getattr(Settings, name)
    shown = EMPTY_DEFAULT.get(name, "none") if default in (None, "") else default
    return f"{HELP.get(name, 'see docs/server.md')} (default: {shown})".replace("%", "%%")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnet-serve", description="Serve an exported ResNet over gRPC with dynamic "
                                "batching. Every flag can also come from RESNET_SERVE_<NAME> or a config file.")
    p.add_argument("--config", type=Path, help="TOML ([server] table or top level) or JSON file of settings")
    for name in FIELDS:
        if name == "verbose":
            p.add_argument("-v", "--verbose", dest=name, action="store_const", const=True, default=None,
                           help="show Paddle's own log lines and warnings (hidden by default)")
            continue
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=_help(name))
    return p


def load_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    args = parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    s = Settings()
    layers: list[tuple[str, dict[str, Any]]] = []
    config = args.config or environ.get(ENV_PREFIX + "CONFIG")
    if config:
        layers.append((f"file {config}", read_config_file(Path(config))))
    layers.append(("env", {n: environ[ENV_PREFIX + n.upper()] for n in FIELDS if ENV_PREFIX + n.upper() in environ}))
    layers.append(("flag", {n: v for n, v in vars(args).items() if n in FIELDS and v is not None}))
    for source, values in layers:
        for name, value in values.items():
            try:
                setattr(s, name, _coerce(name, value))
            except ValueError as e:
                raise ValueError(f"setting {name} from {source}: {e}") from e
            s.sources[name] = source
    s.validate()
    return s
