"""The body of a secondary front process (``--front-processes`` > 1; fronts.py says what the fronts exchange): a
whole Server attached to the first front's workers, listening on the same port, until told to drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection

from resnet_serve.common.malloc import keep_freed_memory

from .app import Server
from .fronts import Drain, FrontFailed, FrontReady, FrontSpec, Scrape, Scraped

log = logging.getLogger(__name__)



def front_main(conn: Connection, spec: FrontSpec) -> None:
    """Process body of a secondary front (the spawn target)."""
    from resnet_serve.common.cli import quiet_frameworks

    # The first front owns shutdown: Ctrl-C in a terminal reaches the whole process group, but only it reacts
    # (it drains every front).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    logging.basicConfig(level=os.environ.get("RESNET_SERVE_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [front {spec.index}] %(name)s: %(message)s")
    quiet_frameworks(spec.settings.verbose)
    sys.exit(asyncio.run(serve_secondary(conn, spec)))


async def serve_secondary(conn: Connection, spec: FrontSpec) -> int:
    """A secondary front's life: attach and listen, report, serve until Drain (or SIGTERM, or the first front's
    pipe closing), drain, exit. Its exit code: 0 after a drain, 1 if it could not start."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    grace = [spec.settings.grace_period_s]
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = Server(spec.settings, front=spec)
    try:
        await server.start()
    except Exception as e:  # noqa: BLE001 - reported to the first front, which fails its start with it
        conn.send(FrontFailed(f"{type(e).__name__}: {e}"))
        await server.stop(0)  # detach from the workers and free this front's shared memory
        return 1
    if server.failed:
        conn.send(FrontFailed(str(server.failed)))
        await server.stop(0)
        return 1
    conn.send(FrontReady(os.getpid()))

    def control() -> None:
        try:
            while True:
                msg = conn.recv()
                if isinstance(msg, Scrape):
                    conn.send(Scraped(msg.seq, server.metrics.exposition()))
                elif isinstance(msg, Drain):
                    grace[0] = msg.grace_s
                    loop.call_soon_threadsafe(stop.set)
        except (EOFError, OSError):  # the first front is gone, and its workers with it: nothing more to serve
            grace[0] = 0.0
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=control, name="front-control", daemon=True).start()
    await stop.wait()
    log.info("front process %d: draining (grace %.0f s)", spec.index, grace[0])
    await server.stop(grace[0])
    return 0
