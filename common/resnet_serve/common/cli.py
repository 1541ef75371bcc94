"""Small helpers every command-line entry point shares: logging set-up and one-line failures."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
QUIET_FLAG = "RESNET_SERVE_QUIET"  # set by quiet_frameworks(); inherited by worker processes

# Framework chatter hidden by default, back with --verbose (README: "Quiet by default"). Environment variables
# are read by Paddle's glog when Paddle is first imported, and inherited by the engine worker processes.
QUIET_ENV = {
    "GLOG_minloglevel": "2",  # glog ERROR and up: no "PIR not support input out tensor", "New Executor is Running",
    "GLOG_v": "0",            # IR-pass and oneDNN INFO/WARNING lines
}
# Python warnings Paddle raises at import ("No ccache found": irrelevant, we never compile C++ extensions).
QUIET_WARNINGS = ("No ccache found",)
# Paddle loggers that attach their own INFO handler at import (INT8 calibration's progress lines).
QUIET_LOGGERS = ("paddle.static.quantization.post_training_quantization", "paddle.static.quantization.quanter",
                 "paddle.static.quantization.quantization_pass", "paddle.static.quantization.cal_kl_threshold",
                 "paddle.static.quantization.adaround")


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("RESNET_SERVE_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _warning_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def quiet_frameworks(verbose: bool = False) -> None:
    """Before Paddle is imported: silence its glog INFO/WARNING lines, its import-time warnings and its INFO
    loggers (here and in every process started from here). verbose: leave everything as the frameworks have it.
    Variables the user set themselves (e.g. GLOG_minloglevel=0) are kept."""
    if verbose:
        return
    os.environ[QUIET_FLAG] = "1"
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    # Once each: every command started from here (the demo's server, the workers) calls this again.
    current = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    ignore = [f"ignore:{message}" for message in QUIET_WARNINGS]
    os.environ["PYTHONWARNINGS"] = ",".join(current + [w for w in ignore if w not in current])
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # in this process also every other UserWarning raised inside Paddle (e.g. one per tensor during --init)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"paddle(\.|$)")
    for name in QUIET_LOGGERS:  # a logger's filters survive the setLevel/addHandler Paddle does at import
        logger = logging.getLogger(name)
        if _warning_only not in logger.filters:
            logger.addFilter(_warning_only)


@contextlib.contextmanager
def framework_output() -> Iterator[None]:
    """Around a Paddle call that writes to the process's stderr itself (C++ std::cerr lines such as oneDNN's
    "--- quantized N ops", tqdm bars of INT8 calibration): in quiet mode its output is held in a temporary file,
    dropped if the call succeeds and replayed if it fails (then it is the diagnosis). Not for threaded code:
    other threads' stderr is held too. Without quiet_frameworks() (library use, --verbose): no effect."""
    if os.environ.get(QUIET_FLAG) != "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
                sys.stderr.flush()


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the frameworks' own log lines and warnings (Paddle's glog, its warnings)")


def fail(message: str, code: int = EXIT_USAGE) -> int:
    """Bad input ends with one clear line on stderr and a non-zero exit, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    return code


class DefaultsFormatter(argparse.HelpFormatter):
    """--help shows each option's default, except where there is none to show (None, False, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == "" or default == argparse.SUPPRESS
        if "%(default)" in text or nothing or not action.option_strings or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
