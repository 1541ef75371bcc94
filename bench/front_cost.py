"""Issue 17: what the server's front costs per image, by process, read from /proc; and the simulated-engine runs.

front_cost  the server (bench/run.py ServerProcess) under request-bounded stream load (raw uint8 tensors): CPU
            (utime + stime of /proc/<pid>/stat) of the front process and of every worker process (the front's
            children, /proc/<pid>/task/*/children, less multiprocessing's resource tracker), taken before and after
            exactly `requests` requests, as µs per image answered; the load generator's own CPU per image beside it
            (this process and its waited-for children, os.times()), and images/s. With a batch N > 1 the same is
            measured once more over the Open Inference Protocol, N images per stream message (the same images in
            flight: concurrency / N messages), where the per-message costs are paid once per N images.
grpc_floor  the same load (and the same measurement, the front alone) against bench/grpc_floor.py: grpcio with
            resnet-serve's request parsing and a fixed answer, no batching, no engine.
simulated   the server over the simulated engine (--engine simulated, a + c*b ms per batch of b): throughput at a
            high concurrency as a ratio of the engine's capacity at max batch (max_batch / (a + max_batch*c) per
            second per instance), and the median latency at concurrency 1 minus (a + c).
Nothing here imports Paddle.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path

from resnet_serve.client.tools.loadgen import LoadConfig
from resnet_serve.client.tools.loadgen import run as run_load

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, those that ended included), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5), after pid and (comm)


def children(pid: int) -> list[int]:
    """The process's direct children, from every one of its threads (a child belongs to the thread that made it)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return sorted(set(out))


def worker_pids(front_pid: int) -> list[int]:
    """The engine workers: the front's children but multiprocessing's resource tracker (it only unlinks memory)."""
    pids = []
    for pid in children(front_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def own_cpu_seconds() -> float:
    """This process's CPU and that of its children it waited for (the load generator's processes, if any)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure_cpu(front_pid: int, load: Callable[[], list[dict]], has_workers: bool = True) -> dict:
    """Run ``load`` (one request-bounded step) and charge the CPU each side spent on it to the images answered.
    ``has_workers`` False: a server of one process (bench/grpc_floor.py)."""
    workers = worker_pids(front_pid) if has_workers else []
    if has_workers and not workers:
        raise RuntimeError(f"server {front_pid} has no worker process")
    before = (cpu_seconds(front_pid), sum(map(cpu_seconds, workers)), own_cpu_seconds())
    steps = load()
    after = (cpu_seconds(front_pid), sum(map(cpu_seconds, workers)), own_cpu_seconds())
    if worker_pids(front_pid) != workers:
        raise RuntimeError("a worker was replaced during the measurement; its CPU would be lost")
    step = steps[0]
    images = (step["requests"] - sum(step["errors"].values())) * step.get("batch", 1)
    if images <= 0:
        raise RuntimeError(f"no image answered: {step['errors']}")
    front, work, gen = (1e6 * (a - b) / images for a, b in zip(after, before, strict=True))
    return {"images": images, "images_per_s": step["images_per_s"], "front_cpu_us_per_image": front,
            "workers_cpu_us_per_image": work, "loadgen_cpu_us_per_image": gen, "workers": len(workers),
            "errors": step["errors"], "latency_ms": step["latency_ms"]}


def stream_load(target: str, hw: tuple[int, int], concurrency: int, requests: int, warmup_s: float = 0.0,
                mode: str = "stream", oip_model: str = "", batch: int = 1) -> list[dict]:
    """One request-bounded step of the load generator, raw uint8 tensors: classifier.v1, or with `oip_model`
    the Open Inference Protocol, `batch` images per request."""
    return run_load(LoadConfig(target=target, mode=mode, input="raw", concurrency=(concurrency,), warmup_s=warmup_s,
                               requests=requests, input_hw=hw, streams=1, processes=1,
                               protocol="oip" if oip_model else "classifier", model=oip_model, batch=batch))


def warmed_oip_step(target: str, hw: tuple[int, int], concurrency: int, requests: int, oip_model: str,
                    batch: int) -> Callable[[], list[dict]]:
    """The same images in flight and answered as `concurrency` and `requests` one per message, as OIP stream
    messages of `batch` images: a warm-up step of them now, and the measured step to run."""
    messages, in_flight = max(1, requests // batch), max(1, concurrency // batch)
    stream_load(target, hw, in_flight, max(in_flight, messages // 10), oip_model=oip_model, batch=batch)
    return lambda: stream_load(target, hw, in_flight, messages, oip_model=oip_model, batch=batch)


def front_cost(target: str, front_pid: int, hw: tuple[int, int], concurrency: int, requests: int,
               oip_model: str = "", batch: int = 1, has_workers: bool = True) -> dict:
    """A short warm-up step (connections, first batches), then the measured one with no warm-up inside it; with
    batch > 1 the same again over OIP, `batch` images per message (under key `oip_batch`). ``has_workers`` False
    for the one-process floor server (bench/grpc_floor.py)."""
    stream_load(target, hw, concurrency, max(concurrency, requests // 10))
    out = measure_cpu(front_pid, lambda: stream_load(target, hw, concurrency, requests), has_workers)
    if batch > 1:
        step = warmed_oip_step(target, hw, concurrency, requests, oip_model, batch)
        out["oip_batch"] = {"batch": batch, **measure_cpu(front_pid, step, has_workers)}
    return out


def capacity_images_per_s(cost_ms: tuple[float, float], max_batch: int, instances: int = 1) -> float:
    """What the simulated engine can compute at most: full batches back to back on every instance."""
    a, c = cost_ms
    seconds = (a + max_batch * c) / 1000.0
    return instances * max_batch / seconds if seconds > 0 else float("inf")


def simulated(target: str, hw: tuple[int, int], cost_ms: tuple[float, float], max_batch: int, concurrency: int,
              requests: int, oip_model: str = "", batch: int = 1) -> dict:
    """Throughput at ``concurrency`` over the capacity at max batch; latency at concurrency 1 over the batch cost.
    With batch > 1 the throughput again over OIP, `batch` images per stream message and the same images in flight
    (under key `oip_batch`)."""
    stream_load(target, hw, 1, max(1, requests // 10))  # warm-up
    high = stream_load(target, hw, concurrency, requests)[0]
    one = stream_load(target, hw, 1, max(1, requests // 4))[0]
    a, c = cost_ms
    p50 = one["latency_ms"]["p50"]
    capacity = capacity_images_per_s(cost_ms, max_batch)
    errors = [high["errors"], one["errors"]]
    out = {"cost_ms": list(cost_ms), "max_batch": max_batch, "concurrency": concurrency,
           "capacity_images_per_s": capacity, "images_per_s": high["images_per_s"],
           "ratio_to_capacity": high["images_per_s"] / capacity,
           "c1_p50_ms": p50, "c1_added_ms": None if p50 is None else p50 - (a + c)}
    if batch > 1:
        many = warmed_oip_step(target, hw, concurrency, requests, oip_model, batch)()[0]
        errors.append(many["errors"])
        out["oip_batch"] = {"batch": batch, "images_per_s": many["images_per_s"],
                            "ratio_to_capacity": many["images_per_s"] / capacity}
    out["errors"] = {k: sum(e.get(k, 0) for e in errors) for k in set().union(*errors)}
    return out


def median_min_max(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
