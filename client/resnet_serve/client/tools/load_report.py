"""The load generator's report: each step as the JSON document states it (summarize) and as a row of the
human-readable table, printed row by row as steps end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .load_steps import LoadConfig, Samples


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float | None]:
    if not len(latencies_s):
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3),
            "max": round(float(ms.max()), 3)}


def summarize(config: LoadConfig, kind: str, load: float, s: Samples) -> dict[str, Any]:
    """One step as the JSON document reports it: counts and latencies per request, images_per_s per image
    (`batch` per successful answer)."""
    return {"concurrency": int(load) if kind == "concurrency" else None,
            "rate": float(load) if kind == "rate" else None,
            "mode": config.mode, "input": config.input, "batch": config.batch, "protocol": config.protocol,
            "processes": config.processes,
            "streams": config.streams if config.mode == "stream" else None,
            "warmup_s": config.warmup_s, "duration_s": round(s.window_s, 6),
            "warmup_requests": s.warmup_requests, "requests": s.requests,
            "images_per_s": round(s.ok_in_window * config.batch / s.window_s, 3) if s.window_s else 0.0,
            "latency_ms": percentiles_ms(s.latencies_s), "errors": dict(sorted(s.errors.items()))}


TABLE_HEAD = ("mode", "input", "batch", "load", "images/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "requests",
              "errors")
TABLE_WIDTHS = (6, 5, 5, 10, 9, 8, 8, 8, 8, 8, 0)  # fixed, so rows printed one by one as steps end line up


def _line(cells: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, TABLE_WIDTHS, strict=True)).rstrip()


def format_header() -> str:
    return _line(TABLE_HEAD)


def format_row(s: dict[str, Any]) -> str:
    """One step as a row of the human-readable report."""
    load = f"c={s['concurrency']}" if s["concurrency"] is not None else f"r={s['rate']:g}/s"
    lat = s["latency_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    errors = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "0"
    return _line([s["mode"], s["input"], str(s["batch"]), load, f"{s['images_per_s']:.1f}", fmt(lat["p50"]),
                  fmt(lat["p90"]), fmt(lat["p99"]), fmt(lat["max"]), str(s["requests"]), errors])


def format_table(steps: Sequence[dict[str, Any]]) -> str:
    """The human-readable report: one row per step."""
    return "\n".join([format_header(), *map(format_row, steps)])
