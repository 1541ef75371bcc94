"""The distributions as users get them: wheels built by pip from each top-level folder, installed into fresh
venvs (no editable install, no shared site-packages). All of them: every module imports and every command's
--help runs; the client alone: neither Paddle nor scikit-learn comes with it, and it classifies against a real
server. Third-party packages come from pip's index and cache (Paddle is ~200 MB: the full install is the
slow part)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the server declares tomli for Python 3.10
    import tomli as tomllib

import numpy as np
import pytest
from PIL import Image

from tests.harness import ROOT, InProcessServer

# folder -> distribution; "." is the root `resnet-serve` that only gathers the others (it holds no code).
PARTS = {"common": "resnet-serve-common", "protos": "resnet-serve-protos", "client": "resnet-serve-client",
         "server": "resnet-serve-server", "export": "resnet-serve-export", "train": "resnet-serve-train",
         ".": "resnet-serve"}
SCRIPTS = ("resnet-train", "resnet-export", "resnet-serve", "resnet-client")
NOT_SOURCE = shutil.ignore_patterns("*.egg-info", "build", "dist", "__pycache__", "*.pyc", ".venv")

# Imports every module of the resnet_serve namespace it can find (run by the venv's Python, outside the repo).
IMPORT_ALL = """
import importlib, json, pkgutil
import resnet_serve
found, failed = [], {}
for m in pkgutil.walk_packages(resnet_serve.__path__, "resnet_serve.", onerror=lambda name: None):
    found.append(m.name)
    try:
        importlib.import_module(m.name)
    except Exception as e:
        failed[m.name] = f"{type(e).__name__}: {e}"
print(json.dumps({"found": found, "failed": failed, "namespace": list(resnet_serve.__path__)}))
"""


def _run(*argv: str | Path, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """A command in a clean environment: nothing of this test run's venv or PYTHONPATH leaks in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, argv))}\n{r.stdout}\n{r.stderr}"
    return r


def _source_modules(part: str) -> set[str]:
    """The modules a part's folder holds, as import names."""
    pkg = ROOT / part / "resnet_serve" / part
    return {".".join(("resnet_serve", part, *p.relative_to(pkg).with_suffix("").parts)).removesuffix(".__init__")
            for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}


def _pip(venv: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """This pip working on another venv (--python): a venv without pip of its own is created in 1 s, not 20."""
    return _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", *args,
                "--disable-pip-version-check", cwd=venv.parent)


def _fresh_venv(path: Path, *requirements: str, wheels: Path | None = None) -> Path:
    """A new venv with `requirements` installed from `wheels` (our distributions) and pip's index (the rest);
    returns its bin/."""
    _run(sys.executable, "-m", "venv", "--without-pip", path, cwd=path.parent)
    _pip(path, "install", "--quiet", "--no-compile", *(("--find-links", wheels) if wheels else ()), *requirements)
    return path / "bin"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every distribution's wheel, built by `pip wheel` from a copy of its folder (a build leaves build/ and
    egg-info behind; the repo stays as it is). One build venv with the build-system requirements for all seven
    instead of pip's isolated build env per wheel (~20 s each here)."""
    src = tmp_path_factory.mktemp("src")
    for part in PARTS:
        if part == ".":
            for name in ("pyproject.toml", "README.md"):
                shutil.copy2(ROOT / name, src / name)
        else:
            shutil.copytree(ROOT / part, src / part, ignore=NOT_SOURCE)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    builder = _fresh_venv(tmp_path_factory.mktemp("build") / "venv", *requires)
    out = tmp_path_factory.mktemp("wheels")
    _run(sys.executable, "-m", "pip", "--python", builder / "python", "wheel", "--quiet", "--no-deps",
         "--no-build-isolation", "--disable-pip-version-check", "--wheel-dir", out,
         *(f"./{part}" if part != "." else "." for part in PARTS), cwd=src)
    return out


def _wheel_of(wheels: Path, dist: str) -> Path:
    (found,) = wheels.glob(f"{dist.replace('-', '_')}-*.whl")
    return found


def test_each_wheel_holds_its_own_part_whole_and_no_namespace_init(wheels: Path) -> None:
    for part, dist in PARTS.items():
        names = zipfile.ZipFile(_wheel_of(wheels, dist)).namelist()
        code = [n for n in names if ".dist-info/" not in n]
        assert "resnet_serve/__init__.py" not in names, dist  # one implicit namespace across all wheels
        if part == ".":
            assert code == [], f"the meta distribution holds code: {code}"
            continue
        assert code and all(n.startswith(f"resnet_serve/{part}/") for n in code), (dist, code)
        shipped = {n.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for n in code if n.endswith(".py")}
        assert shipped == _source_modules(part), dist  # nothing in the folder is missing from the wheel


@pytest.mark.timeout(1800)
def test_all_wheels_in_a_fresh_venv_import_every_module_and_run_every_command(wheels: Path,
                                                                             tmp_path: Path) -> None:
    bin_ = _fresh_venv(tmp_path / "venv", "resnet-serve", wheels=wheels)
    r = _run(bin_ / "python", "-c", IMPORT_ALL, cwd=tmp_path)
    doc = json.loads(r.stdout)
    assert doc["failed"] == {}, json.dumps(doc["failed"], indent=1)
    assert set(doc["found"]) == set().union(*(_source_modules(p) for p in PARTS if p != "."))
    assert all(str(tmp_path / "venv") in p for p in doc["namespace"]), doc["namespace"]  # not the repo's folders
    for script in SCRIPTS:
        help_ = _run(bin_ / script, "--help", cwd=tmp_path, timeout=300)
        assert help_.stdout.startswith(f"usage: {script}"), help_.stdout


@pytest.mark.timeout(900)
def test_the_client_alone_installs_without_paddle_and_classifies(wheels: Path, tmp_path: Path,
                                                                 tiny_model_dir: Path) -> None:
    bin_ = _fresh_venv(tmp_path / "venv", "resnet-serve-client", wheels=wheels)
    installed = {d["name"].lower() for d in json.loads(_pip(tmp_path / "venv", "list", "--format", "json").stdout)}
    assert {"resnet-serve-client", "resnet-serve-protos", "resnet-serve-common"} <= installed
    unwanted = {"paddlepaddle", "paddlepaddle-gpu", "scikit-learn", "resnet-serve-server", "resnet-serve-train",
                "resnet-serve-export", "tritonclient"} & installed
    assert unwanted == set()
    # Every client module imports, but the OIP transport: tritonclient is the optional `oip` extra.
    doc = json.loads(_run(bin_ / "python", "-c", IMPORT_ALL, cwd=tmp_path).stdout)
    assert set(doc["found"]) == _source_modules("client") | _source_modules("protos") | _source_modules("common")
    assert doc["failed"].keys() == {"resnet_serve.client.tools.oip_transport"}
    assert "tritonclient" in doc["failed"]["resnet_serve.client.tools.oip_transport"]

    image = tmp_path / "picture.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    server = InProcessServer(model_dir=str(tiny_model_dir), threads_per_instance=1)
    try:
        r = _run(bin_ / "resnet-client", "classify", image, "--target", server.address, "--top-k", "3", "--json",
                 cwd=tmp_path, timeout=120)
    finally:
        server.close()
    (answer,) = json.loads(r.stdout)
    assert answer["image"] == str(image) and answer["model_version"] == "1"
    assert len(answer["predictions"]) == 3 and 0 < answer["predictions"][0]["score"] <= 1
    assert {p["label"] for p in answer["predictions"]} <= set((tiny_model_dir / "1" / "labels.txt").read_text().split())
