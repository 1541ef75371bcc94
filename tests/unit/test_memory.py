"""memory: the sweeper that gives large requests' memory back after a burst (server/resnet_serve/server/memory.py)."""

from __future__ import annotations

import asyncio
import gc

from resnet_serve.server.memory import MemorySweeper


def test_requests_are_counted_until_a_sweep() -> None:
    sweeper = MemorySweeper(threshold_bytes=1000)
    sweeper.note(10)
    sweeper.note(990)
    assert (sweeper.received, sweeper.sweeps) == (1000, 0)  # counted on note; swept only by run()


def test_startup_objects_are_frozen_out_of_the_collectors_sight() -> None:
    before = gc.get_freeze_count()
    try:
        MemorySweeper.freeze_startup()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def test_memory_sweeper_sweeps_after_a_burst_of_large_requests() -> None:
    from resnet_serve.server.memory import MemorySweeper

    async def main() -> None:
        sweeper = MemorySweeper(threshold_bytes=800, interval_s=0.01, quiet_bytes=100)
        task = asyncio.ensure_future(sweeper.run())
        try:
            sweeper.note(800)  # the threshold: swept at the next tick
            while sweeper.sweeps < 1:
                await asyncio.sleep(0.01)
            assert sweeper.received == 0
            sweeper.note(100)  # quiet_bytes, then quiet: swept once the burst is over
            while sweeper.sweeps < 2:
                await asyncio.sleep(0.01)
        finally:
            task.cancel()

    asyncio.run(asyncio.wait_for(main(), 60))
