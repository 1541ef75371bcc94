"""`bench --baseline REV`: the server of another commit, to measure beside the current one in the same run.

Issue 17's figures are ratios to the previous commit measured on the same loaded machine in the same rounds, so
REV gets (once, cached under bench/.baseline/<sha>/, git-ignored) a `git worktree` and a virtualenv whose only
packages of its own are REV's six parts, installed editable without dependencies; every other package (pip and
setuptools included) comes from the current interpreter's site-packages through a .pth file (no download, the same
Paddle and gRPC on both sides).
Its server starts from that virtualenv's own `resnet-serve` entry point.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".baseline"
PARTS = ("common", "protos", "client", "server", "export", "train")


def resolve(rev: str) -> str:
    """The full commit id of ``rev`` (ValueError if git does not know it)."""
    r = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode != 0:
        raise ValueError(f"--baseline {rev}: not a commit of {ROOT}")
    return r.stdout.strip()


def shared_site_packages() -> list[str]:
    """The site-packages directories this interpreter imports third-party packages from (a venv that shares
    another's packages lists that one through its own .pth), as plain paths for the baseline's .pth file. Its own
    comes last: a venv made to share another's packages may hold an older setuptools than the parts need."""
    own = sysconfig.get_paths()["purelib"]
    shared = [p for p in dict.fromkeys(sys.path) if p.endswith("site-packages") and p != own and Path(p).is_dir()]
    return [*shared, own]


def knows_flag(exe: Path, flag: str) -> bool:
    """Whether that build's server takes ``flag`` (its --help names it): a baseline is run with the same settings
    as the current server wherever it has them."""
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    return r.returncode == 0 and flag in r.stdout


def prepare(rev: str, log=lambda msg: None) -> tuple[str, Path]:
    """(short sha, the baseline's `resnet-serve` executable), creating worktree and venv on first use."""
    sha = resolve(rev)
    home = CACHE / sha
    exe = home / "venv" / "bin" / "resnet-serve"
    if exe.is_file():
        return sha[:7], exe
    src, venv = home / "src", home / "venv"
    home.mkdir(parents=True, exist_ok=True)
    if not (src / ".git").exists():
        log(f"baseline {sha[:7]}: git worktree under {src}")
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(src), sha], check=True, cwd=ROOT,
                       capture_output=True)
    log(f"baseline {sha[:7]}: virtualenv {venv} sharing this one's packages")
    # no pip of its own: pip and setuptools come from the shared site-packages too (the parts need setuptools>=77)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # "zz": after the editable installs' own .pth files, so REV's parts come first on sys.path
    (Path(purelib) / "zz_shared.pth").write_text("\n".join(shared_site_packages()) + "\n")
    editable = [arg for part in PARTS for arg in ("-e", str(src / part))]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", *editable], check=True, capture_output=True)
    if not exe.is_file():
        raise RuntimeError(f"baseline {sha[:7]}: {exe} was not installed")
    return sha[:7], exe
