"""common/malloc.py: glibc keeps a freed large buffer's pages instead of returning them to the kernel (so the next
one is not faulted in again)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from resnet_serve.common import malloc

# In a fresh interpreter: touch an 8 MB buffer (under both thresholds), free it, and report how much of it is still
# resident.
PROBE = """
import json, os, sys
from resnet_serve.common.malloc import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
buf = b"\\x01" * (8 << 20)
held = rss()
del buf
print(json.dumps({"tuned": tuned, "kept": rss() - (held - (8 << 20))}))
"""


def probe(mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffer_stays_resident_only_when_tuned() -> None:
    """Untuned, glibc maps an 8 MB buffer on its own and unmaps it when freed (its pages go back to the kernel);
    tuned, it comes from the heap and stays there for the next one. The difference is the buffer's size, counted
    in resident bytes (no timing)."""
    default, tuned = probe("default"), probe("tuned")
    assert tuned["tuned"] is True
    assert default["kept"] < 2 << 20, default
    assert tuned["kept"] >= 7 << 20, tuned


class NotGlibc:
    """A C library without gnu_get_libc_version (musl's, say): its mallopt must not be called."""

    def __getattr__(self, name: str):
        if name == "mallopt":
            raise AssertionError("mallopt called on a C library that is not glibc")
        raise AttributeError(name)


def test_a_c_library_that_is_not_glibc_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *a, **k: NotGlibc())
    assert malloc.keep_freed_memory() is False
