"""common/resnet_serve/common/cli.py: the command-line conventions every part shares."""

from __future__ import annotations

from tests.harness import run_cli


def test_held_framework_output_is_dropped_on_success_and_replayed_on_failure() -> None:
    code = """
import os, sys
from resnet_serve.common.cli import framework_output, quiet_frameworks
quiet_frameworks()
with framework_output():
    os.write(2, b"chatter of a call that worked\\n")
try:
    with framework_output():
        os.write(2, b"what the failing call said\\n")
        raise RuntimeError("boom")
except RuntimeError:
    pass
print("done", file=sys.stderr)
"""
    r = run_cli("python", "-c", code)
    assert r.returncode == 0 and r.stderr == "what the failing call said\ndone\n"
