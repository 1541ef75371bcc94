"""Small helpers every command-line entry point shares: logging set-up and one-line failures."""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_USAGE = 2


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("RESNET_SERVE_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def fail(message: str, code: int = EXIT_USAGE) -> int:
    """Bad input ends with one clear line on stderr and a non-zero exit, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    return code


class DefaultsFormatter(argparse.HelpFormatter):
    """--help shows each option's default, except where there is none to show (None, False, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default in (None, False, "", argparse.SUPPRESS) or not action.option_strings
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
