"""common/resnet_serve/common/cli.py: the command-line conventions every part shares."""

from __future__ import annotations

import argparse
import json

import pytest

from resnet_serve.common.cli import EXIT_USAGE, DefaultsFormatter, add_verbose_flag, fail
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


def test_quiet_frameworks_hides_chatter_but_keeps_what_the_user_set() -> None:
    """In a fresh interpreter (it changes the environment, warning filters and loggers of its process)."""
    code = """
import json, logging, os, warnings
from resnet_serve.common.cli import QUIET_LOGGERS, quiet_frameworks
quiet_frameworks(verbose=True)
untouched = "RESNET_SERVE_QUIET" not in os.environ and "GLOG_v" not in os.environ
quiet_frameworks()
quiet_frameworks()  # twice: no second filter
logger = logging.getLogger(QUIET_LOGGERS[0])
with warnings.catch_warnings(record=True) as seen:
    warnings.warn("No ccache found. Please be aware", UserWarning)
print(json.dumps({"untouched": untouched, "quiet": os.environ["RESNET_SERVE_QUIET"],
                  "glog_min": os.environ["GLOG_minloglevel"], "glog_v": os.environ["GLOG_v"],
                  "pywarnings": os.environ["PYTHONWARNINGS"], "filters": len(logger.filters),
                  "info_passes": logger.filters[0](logging.makeLogRecord({"levelno": logging.INFO})),
                  "warning_passes": logger.filters[0](logging.makeLogRecord({"levelno": logging.WARNING})),
                  "ccache_warnings": len(seen)}))
"""
    r = run_cli("python", "-c", code, env={"GLOG_minloglevel": "0", "PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "untouched": True, "quiet": "1", "glog_min": "0", "glog_v": "0",  # the user's GLOG_minloglevel=0 stays
        "pywarnings": "default,ignore:No ccache found", "filters": 1, "info_passes": False, "warning_passes": True,
        "ccache_warnings": 0}


def test_fail_is_one_error_line_and_the_usage_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert fail("--epochs must be at least 1, got 0") == EXIT_USAGE == 2
    assert fail("boom", code=3) == 3
    out, err = capsys.readouterr()
    assert out == "" and err == "error: --epochs must be at least 1, got 0\nerror: boom\n"


def test_help_shows_defaults_only_where_there_is_one() -> None:
    p = argparse.ArgumentParser(formatter_class=DefaultsFormatter)
    p.add_argument("--epochs", type=int, default=5, help="passes over the data")
    p.add_argument("--init", default=None, help="weights to start from")
    p.add_argument("--out", default="", help="where to write")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate (default: 0.1 per 256 images)")
    add_verbose_flag(p)
    text = " ".join(p.format_help().split())
    assert "passes over the data (default: 5)" in text
    assert "weights to start from --out" in text and "where to write --lr" in text  # no default shown
    assert "(default: 0.1 per 256 images)" in text and "(default: 0.1)" not in text  # the help says it already
    assert "(default: False)" not in text and "-v, --verbose show the frameworks' own log lines" in text
