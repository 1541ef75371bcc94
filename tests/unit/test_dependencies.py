"""The allowed dependencies of docs/architecture.md ("Parts and what each may know"), enforced.

Behavioural where it can be: each rule about what a module may pull in imports that module in a fresh interpreter
and reads `sys.modules`, so an import hidden behind another module is caught too (and the failure names the chain
that brought it in). The rules about the source itself are checked by parsing every module of the six parts and
bench/: no import circle (module-level, function-level and TYPE_CHECKING imports alike: each is a module
knowing another), no use of another module's `_private` name, and every part's pyproject.toml declares what its
modules import at module level.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from itertools import pairwise
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("common", "protos", "client", "server", "export", "train")

# --- behavioural: what importing a module loads --------------------------------------------------------------------

# Imports the modules named by argv[1:], in order, and prints every module then in sys.modules with the module that
# first imported it: a meta-path finder that finds nothing records who asked (the innermost frame outside the
# import machinery).
_PROBE = r"""
import importlib, json, sys

first = {}

class Recorder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in first:
            f = sys._getframe(1)
            while f is not None and (f.f_code.co_filename.startswith("<frozen importlib")
                                     or f.f_globals.get("__name__", "").startswith("importlib")):
                f = f.f_back
            first[name] = f.f_globals.get("__name__", "?") if f is not None else "?"
        return None

sys.meta_path.insert(0, Recorder)
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({m: first.get(m) for m in sys.modules}))
"""


def _walk(package: str) -> tuple[str, ...]:
    """The package and every module in it, found on disk (pkgutil over the package's folder)."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    return (package, *sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}.")))


@dataclass(frozen=True)
class Rule:
    """Importing any of `modules` (each, and so all of them in one interpreter) loads nothing under `forbidden`
    (top-level modules or resnet_serve packages) but the rule's own modules, their packages and what is under
    `own`, because `why`."""
    modules: tuple[str, ...]
    forbidden: tuple[str, ...]
    why: str
    own: str = "-"

    def allows(self, module: str) -> bool:
        return (module == self.own or module.startswith(self.own + ".")
                or any(m == module or m.startswith(module + ".") for m in self.modules))


S = "resnet_serve.server."
CLIENT_TOOLS = "resnet_serve.client.tools"
SERVER = _walk("resnet_serve.server")
# The engine side: the engine, its workers and the predictor they build (engine*, worker*, predictor*, trt_cache).
ENGINE_SIDE = tuple(m for m in SERVER if m[len(S):].startswith(("engine", "worker", "predictor", "trt_cache")))
# docs/architecture.md, "Parts and what each may know", as far as importing a module shows it.
RULES = {
    "batcher": Rule((S + "batcher",), ("grpc", "paddle"), "the batcher knows nothing of gRPC or Paddle"),
    "engine-side": Rule(ENGINE_SIDE, ("grpc", "asyncio"),
                        "engine and worker (and the predictor side they use) know nothing of gRPC or asyncio"),
    "server": Rule(SERVER, ("paddle",), "no server module imports Paddle when imported: the front process never "
                   "does, and the worker imports it inside the worker process only"),
    "pipeline": Rule((S + "pipeline", S + "preprocess"), ("grpc", "paddle"),
                     "the pipeline and preprocessing know neither gRPC nor Paddle"),
    "front": Rule((S + "app", S + "cli"), ("paddle",), "the front process never imports Paddle"),
    "metrics": Rule((S + "metrics",), ("resnet_serve", "grpc", "paddle"),
                    "metrics knows prometheus_client only (the others call it)"),
    "health-port": Rule((S + "health_port",), ("resnet_serve", "paddle"),
                        "the health port knows gRPC's health service only (app.py sets its statuses)"),
    "client": Rule(_walk("resnet_serve.client"), ("resnet_serve.server", "resnet_serve.export", "resnet_serve.train",
                                                  "paddle", "sklearn"),
                   "the client imports nothing of the server, export or train, nor Paddle or scikit-learn"),
    "client-library": Rule(tuple(m for m in _walk("resnet_serve.client") if not m.startswith(CLIENT_TOOLS)),
                           (CLIENT_TOOLS, "tritonclient"),
                           "the client library knows nothing of its tools (CLI, demo, load generator) "
                           "nor tritonclient"),
    "common": Rule(_walk("resnet_serve.common"), ("resnet_serve", "paddle", "grpc"),
                   "common depends on no other part and on neither Paddle nor gRPC", own="resnet_serve.common"),
    "protos": Rule(_walk("resnet_serve.protos"), ("resnet_serve", "paddle"),
                   "protos depends on no other part and not on Paddle", own="resnet_serve.protos"),
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, dict[str, str | None]]:
    """rule -> {every module importing its modules loads: the module that imported that one first}, one fresh
    interpreter per rule, all at once."""
    procs = {name: subprocess.Popen([sys.executable, "-c", _PROBE, *rule.modules], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=ROOT) for name, rule in RULES.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"importing {RULES[name].modules} failed:\n{stderr}"
        out[name] = json.loads(stdout)
    return out


def _chain(first: dict[str, str | None], name: str) -> str:
    """root -> ... -> name: who imported whom to load `name`."""
    out = [name]
    while (up := first.get(out[-1])) and up in first and up != "__main__" and up not in out:
        out.append(up)
    return " -> ".join(reversed(out))


@pytest.mark.parametrize("rule", RULES)
def test_importing_loads_nothing_the_module_must_not_know(rule: str, loaded: dict[str, dict[str, str | None]]) -> None:
    r, got = RULES[rule], loaded[rule]
    hits = [f"{bad}: {_chain(got, m)}" for bad in r.forbidden for m in sorted(got)
            if (m == bad or m.startswith(bad + ".")) and not r.allows(m)][:20]
    assert not hits, f"{r.why}, but importing {', '.join(r.modules)} loads:\n  " + "\n  ".join(hits)


def test_a_rule_allows_only_its_own_modules_and_their_packages() -> None:
    metrics, common = RULES["metrics"], RULES["common"]
    assert metrics.allows("resnet_serve") and metrics.allows("resnet_serve.server") and metrics.allows(S + "metrics")
    assert not metrics.allows(S + "batcher") and not metrics.allows("resnet_serve.common")
    assert common.allows("resnet_serve.common.imaging") and not common.allows("resnet_serve.protos")


def test_probe_sees_what_a_module_loads(loaded: dict[str, dict[str, str | None]]) -> None:
    """The probe itself: the front does load gRPC, through the module that imports it."""
    front = loaded["front"]
    chain = _chain(front, "grpc").split(" -> ")
    assert chain[0] == "resnet_serve.server.app" and chain[-1] == "grpc", chain
    assert all(m.startswith("resnet_serve.server.") for m in chain[:-1]), chain
    assert all(m in loaded["client"] for m in RULES["client"].modules)  # every client module was imported
    assert {S + "engine", S + "worker", S + "predictor_config", S + "trt_cache"} <= set(ENGINE_SIDE)
    assert S + "batcher" not in ENGINE_SIDE and S + "app" in SERVER


# --- static: the source of every module ----------------------------------------------------------------------------


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    is_package: bool

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]

    @property
    def where(self) -> str:
        return str(self.path.relative_to(ROOT))


def _source_modules() -> dict[str, Module]:
    """Every module of the six parts (resnet_serve.<part>.*) and of bench/ (bench.*), by dotted name."""
    roots = [(ROOT / part, ROOT / part / "resnet_serve" / part) for part in PARTS] + [(ROOT, ROOT / "bench")]
    mods = {}
    for base, folder in roots:
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = list(rel.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join(parts)
            mods[name] = Module(name, path, ast.parse(path.read_text(), str(path)), is_package)
    return mods


MODULES = _source_modules()


@dataclass
class Import:
    """One imported name: `target` is the module it resolves to (the longest known prefix), `name` the imported
    name when it is not itself a module (`from target import name`)."""
    line: int
    target: str
    name: str | None = None
    module_level: bool = True
    guard: str = ""  # "under TYPE_CHECKING" or "behind except ImportError": not needed to import the module
    full: str = ""  # the dotted name as written (resolved when relative)


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: Module) -> Iterator[Import]:
    """Every import statement of `mod`, anywhere in it, each name resolved to a module when it names one."""

    def walk(node: ast.AST, module_level: bool, guard: str) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield Import(child.lineno, a.name, None, module_level, guard, a.name)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(mod, child)
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    if sub in MODULES:
                        yield Import(child.lineno, sub, None, module_level, guard, sub)
                    else:
                        yield Import(child.lineno, base, a.name, module_level, guard, base)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, False, guard)
            elif isinstance(child, ast.Try) and any(_catches_import_error(h) for h in child.handlers):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), module_level,
                                    guard or "behind except ImportError")
                for rest in (*child.handlers, *child.orelse, *child.finalbody):
                    yield from walk(rest, module_level, guard)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), module_level, "under TYPE_CHECKING")
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), module_level, guard)
            else:
                yield from walk(child, module_level, guard)

    yield from walk(mod.tree, True, "")


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = [handler.type] if not isinstance(handler.type, ast.Tuple) else list(handler.type.elts)
    return handler.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError",
                                                                          "Exception") for n in names)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _known(name: str) -> str | None:
    """The longest prefix of `name` that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _import_graph() -> dict[str, dict[str, Import]]:
    """module -> {module it imports: the statement that does, a plain module-level one first}, over our modules
    only. Importing a module also runs its packages' __init__, so those are edges too."""
    graph: dict[str, dict[str, Import]] = defaultdict(dict)

    def strength(imp: Import) -> tuple[bool, bool]:
        return imp.module_level, not imp.guard

    for mod in MODULES.values():
        for imp in _imports(mod):
            target = _known(imp.target)
            while target:
                seen = graph[mod.name].get(target)
                if target != mod.name and (seen is None or strength(imp) > strength(seen)):
                    graph[mod.name][target] = imp
                target = _known(target.rpartition(".")[0]) if "." in target else None
    return graph


def _cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module (Tarjan, then BFS)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(MODULES):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:
        start, members = comp[0], set(comp)
        paths = {start: [start]}
        frontier = [start]
        found = None
        while frontier and not found:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, {})):
                    if w == start:
                        found = paths[v] + [start]
                        break
                    if w in members and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        cycles.append(found or comp)
    return cycles


def test_no_import_circle() -> None:
    graph = _import_graph()
    lines = []
    for cycle in _cycles(graph):
        lines.append("circle: " + " -> ".join(cycle))
        for a, b in pairwise(cycle):
            imp = graph[a][b]
            level = ", ".join(filter(None, ["module level" if imp.module_level else "inside a function", imp.guard]))
            lines.append(f"    {MODULES[a].where}:{imp.line} imports {b} ({level})")
    assert not lines, ("import circles between modules (module-level, function-level and TYPE_CHECKING imports "
                       "alike):\n" + "\n".join(lines))


def test_graph_sees_the_imports_it_should() -> None:
    """The circle check is only as good as the graph: a few edges that exist today, each spelled differently."""
    graph = _import_graph()
    assert "resnet_serve.server.batcher" in graph["resnet_serve.server.app"]  # from .batcher import X
    assert "resnet_serve.common.modeldir" in graph["resnet_serve.server.app"]  # from resnet_serve.common.x import
    assert "resnet_serve.server.app" in graph["resnet_serve.server.cli"]  # inside a function
    assert "resnet_serve.protos.classifier_pb2" in graph["resnet_serve.protos.classifier_pb2_grpc"]  # from pkg import m


# --- private names --------------------------------------------------------------------------------------------------

PRIVATE = re.compile(r"^_[A-Za-z0-9_]*$")


def _is_private(name: str) -> bool:
    return bool(PRIVATE.match(name)) and name != "_" and not (name.startswith("__") and name.endswith("__"))


def _defined(mod: Module) -> set[str]:
    """The private names `mod` defines: functions, classes, variables, and attributes it sets on self/cls."""
    names: set[str] = set()
    for node in ast.walk(mod.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
              and node.value.id in ("self", "cls")):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _is_private(n)}


def _private_uses(mod: Module, defined: dict[str, set[str]]) -> Iterator[str]:
    own = defined[mod.name]
    owners: dict[str, list[str]] = defaultdict(list)
    for other, names in defined.items():
        if other != mod.name:
            for n in names:
                owners[n].append(other)
    for imp in _imports(mod):
        if imp.name and _is_private(imp.name) and _known(imp.target) and imp.target != mod.name:
            yield f"{mod.where}:{imp.line}: `from {imp.target} import {imp.name}`"
        elif imp.name is None and _known(imp.target) and any(_is_private(p) for p in imp.target.split(".")):
            yield f"{mod.where}:{imp.line}: imports the private module {imp.target}"
    for node in ast.walk(mod.tree):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name = node.args[1].value
        if name and _is_private(name) and name not in own and owners.get(name):
            yield (f"{mod.where}:{node.lineno}: `{ast.unparse(node)}` uses {name}, private to "
                   f"{', '.join(sorted(owners[name]))}")


def _by_place(v: str) -> tuple[str, int]:
    where, line, _ = v.split(":", 2)
    return where, int(line)


def test_no_private_name_used_outside_its_module() -> None:
    """A leading-underscore name is used only in the module that defines it: no `from m import _x`, and no
    `obj._x` / getattr(obj, "_x") in a module that does not define `_x` itself when one of ours does."""
    defined = {name: _defined(mod) for name, mod in MODULES.items()}
    found = sorted({v for mod in MODULES.values() for v in _private_uses(mod, defined)}, key=_by_place)
    assert not found, "private names used outside the module that defines them:\n  " + "\n  ".join(found)


def test_private_check_sees_what_it_should() -> None:
    """The check on two made-up modules: a private function imported or reached through the module, a private
    attribute of another module's object, by attribute and by getattr; its own privates are fine."""
    owner = Module("resnet_serve.server.made_owner", ROOT / "owner.py", ast.parse(
        "def _helper(): pass\nclass A:\n    def __init__(self):\n        self._state = 1\n    def _run(self): pass\n"),
        False)
    user = Module("resnet_serve.server.made_user", ROOT / "user.py", ast.parse(
        "from resnet_serve.server.made_owner import _helper\n"
        "from resnet_serve.server import made_owner\n"
        "made_owner._helper()\n"
        "class B:\n    def __init__(self, a):\n        self._mine = a._state\n        getattr(a, '_run')()\n"
        "        self._mine.__class__\n        sys._getframe()\n"), False)
    defined = {m.name: _defined(m) for m in (owner, user)}
    got = [v.split(": ", 1)[1] for v in _private_uses(user, defined)]
    assert sorted(got) == sorted([
        "`from resnet_serve.server.made_owner import _helper`",
        "`made_owner._helper` uses _helper, private to resnet_serve.server.made_owner",
        "`a._state` uses _state, private to resnet_serve.server.made_owner",
        "`getattr(a, '_run')` uses _run, private to resnet_serve.server.made_owner"]), got


# --- declared dependencies ------------------------------------------------------------------------------------------


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _declared(part: str) -> set[str]:
    """The distributions `part`'s pyproject.toml depends on (its extras included: a module may need one)."""
    project = tomllib.loads((ROOT / part / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_requirement_name(r) for r in reqs}


def _requirement_name(requirement: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9_.-]+", requirement.strip()).group(0))


@functools.cache
def _distributions() -> dict[str, set[str]]:
    """Top-level import name -> the (normalised) installed distributions that provide it."""
    return {top: {_norm(d) for d in ds} for top, ds in packages_distributions().items()}


def _undeclared(part: str, modules: list[Module], declared: set[str], module_level_only: bool = True,
                local: tuple[str, ...] = ()) -> list[str]:
    """The imports (module-level only, unless told; never those behind `except ImportError` or TYPE_CHECKING) of
    `modules` that `declared` (normalised distribution names) does not cover: third-party distributions and other
    resnet_serve parts. `local`: top-level names that are folders of this repository, not distributions."""
    dists = _distributions()
    missing = []
    for mod in modules:
        for imp in _imports(mod):
            if (module_level_only and not imp.module_level) or imp.guard:
                continue
            top = imp.full.split(".")[0]
            if top in sys.stdlib_module_names or top in ("__future__", *local) or _norm(top) in declared:
                continue
            if top == "resnet_serve":
                other = imp.full.split(".")[1]
                if other == part:
                    continue
                need = {f"resnet-serve-{other}"}
            elif not (need := dists.get(top, set())):
                missing.append(f"{mod.where}:{imp.line}: imports {top}, which no installed distribution provides")
                continue
            if not need & declared:
                missing.append(f"{mod.where}:{imp.line}: imports {imp.full} ({' or '.join(sorted(need))}), "
                               f"not in {part}/pyproject.toml")
    return missing


@pytest.mark.parametrize("part", PARTS)
def test_part_declares_what_its_modules_import(part: str) -> None:
    """Every third-party distribution and every other resnet_serve part a module imports at module level is in
    its part's pyproject.toml dependencies (or one of its extras)."""
    modules = [m for m in MODULES.values() if m.name.startswith(f"resnet_serve.{part}")]
    missing = _undeclared(part, modules, _declared(part))
    assert not missing, "undeclared module-level dependencies:\n  " + "\n  ".join(missing)


def test_undeclared_check_sees_what_it_should() -> None:
    """The check on a made-up client module: what it imports at module level must be declared; imports inside
    a function, behind `except ImportError` or TYPE_CHECKING need not be."""
    src = """
import json
import numpy as np
import prometheus_client
from PIL import Image
from resnet_serve.common import imaging
from resnet_serve.server.metrics import Metrics
from . import sync
from typing import TYPE_CHECKING
try:
    import sklearn
except ImportError:
    sklearn = None
if TYPE_CHECKING:
    import paddle
def later():
    import paddle
"""
    path = ROOT / "client" / "resnet_serve" / "client" / "made_up.py"
    mod = Module("resnet_serve.client.made_up", path, ast.parse(src), False)
    missing = _undeclared("client", [mod], _declared("client"))
    assert [m.split(": ", 1)[1].split(" (")[0] for m in missing] == [
        "imports prometheus_client", "imports resnet_serve.server.metrics"], missing


def test_tests_import_only_what_the_dev_install_brings() -> None:
    """tests/ (every import, in functions too) needs only what `pip install -e .[dev]` of the root installs: the
    root's dependencies and dev extra, and through them every part's dependencies; plus bench/ and tests/."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]}
    for part in PARTS:
        declared |= _declared(part)
    modules = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules.append(Module(name, path, ast.parse(path.read_text(), str(path)), is_package))
    missing = _undeclared("", modules, declared, module_level_only=False, local=("tests", "bench"))
    assert not missing, "tests import what the dev install does not bring:\n  " + "\n  ".join(missing)


def test_tests_use_no_private_name_of_the_source() -> None:
    """Tests hold the source to its public names too: a test that needs a private name is testing the wrong thing
    or the module lacks a public way to observe it."""
    defined = {name: _defined(mod) for name, mod in MODULES.items()}
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path == Path(__file__).resolve():
            continue  # its own examples name private names on purpose
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mod = Module(name, path, ast.parse(path.read_text(), str(path)), path.name == "__init__.py")
        found += _private_uses(mod, {**defined, name: _defined(mod)})
    assert not found, "tests use private names of the source:\n  " + "\n  ".join(sorted(found, key=_by_place))
