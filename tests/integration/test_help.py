"""Every command's --help: each option explained, defaults shown (as the command really uses them)."""

from __future__ import annotations

import re

import pytest

from tests.harness import run_cli

# (command line, defaults that --help must state, as "(default: X)" with X as printed)
COMMANDS = [
    (["resnet-train"], {"--epochs": "5", "--batch-size": "64", "--lr": "0.05", "--arch": "resnet18",
                        "--input-size": "32", "--seed": "0"}),
    (["resnet-export"], {"--format": "pir", "--precision": "fp32", "--calibration-samples": "256",
                         "--threshold": "0.99"}),
    (["resnet-serve"], {"--host": "0.0.0.0", "--port": "50051", "--metrics-port": "8000",
                        "--metrics-host": "the --host", "--health-port": "50052", "--health-host": "the --host",
                        "--max-batch-size": "8", "--max-queue-delay-us": "2000",
                        "--instances": "1", "--grace-period-s": "30.0", "--version": "the highest"}),
    (["resnet-client", "classify"], {"--target": "localhost:50051", "--top-k": "0"}),
    (["resnet-client", "stream"], {"--target": "localhost:50051", "--window": "32"}),
    (["resnet-client", "info"], {"--target": "localhost:50051"}),
    (["resnet-client", "health"], {"--wait": "0.0"}),
    (["resnet-client", "bench"], {"--concurrency": "1", "--mode": "unary", "--warmup": "1.0", "--duration": "5.0",
                                  "--streams": "1", "--processes": "1", "--protocol": "classifier"}),
    (["python", "-m", "resnet_serve.client.tools.demo"], {"--port": "50051", "--min-accuracy": "0.8"}),
]


def options(help_text: str) -> dict[str, str]:
    """--option -> its help text (argparse's layout: the text after the option, or on the indented lines below)."""
    out: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        m = re.match(r"^  (-\w, )?(--[\w-]+)(?: [^ ]+(?: [^ ]+)*?)?(?:  +(.*))?$", line)
        if m:
            current = m.group(2)
            out[current] = m.group(3) or ""
        elif current and re.match(r"^ {6,}\S", line):
            out[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in out.items()}


@pytest.mark.parametrize("argv,defaults", COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_help_explains_every_option_and_states_defaults(argv: list[str], defaults: dict[str, str]) -> None:
    r = run_cli(*argv, "--help", timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    opts = options(r.stdout)
    assert opts and "--help" in opts
    undocumented = [name for name, text in opts.items() if not text]
    assert undocumented == [], f"{' '.join(argv)}: options without help: {undocumented}"
    for name, value in defaults.items():  # "(default: X)" from the formatter, or "default X" in the text
        assert re.search(rf"default:? {re.escape(value)}(\W|$)", opts[name]), f"{name}: {opts[name]!r}"
    assert "a exported" not in r.stdout
