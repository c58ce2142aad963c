"""The package's shape: its folders are layers, and every import points down.

Read from the source (``ast``, lazy imports inside functions included), so an upward import
anywhere fails here with the file, the line and both layers named.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "polydet"

# Lowest first. A module may import its own folder and any lower layer, nothing else.
LAYERS: dict[str, int] = {
    "core": 0,  # settings, errors, files, locks, MLflow store address / model-URI cache
    "geometry": 1,  # polybox, ops, coder
    "model": 2,
    "data": 2,
    "eval": 3,
    "train": 4,
    "deploy": 5,  # predict, export
    "debug": 5,
    "stages": 6,  # the stage table: runs the stages below, read by tracking and pipeline
    "tracking": 7,
    "pipeline": 8,
    "cli": 9,
}
# The public paths of DESIGN.md that now live deeper: importing one gives the deeper module.
ALIASES = {
    "polydet.polybox": "polydet.geometry.polybox",
    "polydet.ops": "polydet.geometry.ops",
    "polydet.coder": "polydet.geometry.coder",
    "polydet.config": "polydet.core.config",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """The layer of ``polydet.<layer>...``; None for the package root and the aliases."""
    parts = module.split(".")
    if parts[0] != "polydet" or len(parts) < 2 or module in ALIASES:
        return None
    return parts[1] if parts[1] in LAYERS else "?" + parts[1]


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of polydet or flows in a parsed file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "polydet":  # from polydet import x: the module polydet.x
                found += [(node.lineno, f"polydet.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    keep = ("polydet", "flows")
    return [(n, m) for n, m in found if m.split(".")[0] in keep and m != "polydet"]


def violations(path: Path, source: str) -> list[str]:
    """Why each polydet/flows import in ``source`` (the file ``path``) breaks the layering."""
    me = layer_of(module_name(path))
    bad = []
    for line, target in imported(ast.parse(source)):
        where = f"{path.relative_to(ROOT)}:{line}: imports {target}"
        if target.split(".")[0] == "flows":
            bad.append(f"{where}: the package never imports flows/")
        elif target in ALIASES:
            bad.append(f"{where}: use {ALIASES[target]} inside the package")
        elif me is None:
            continue  # the package root and the aliases themselves
        elif me.startswith("?"):
            bad.append(f"{where}: {me[1:]} is in no layer (add it to LAYERS)")
        else:
            other = layer_of(target)
            if other is None or other.startswith("?"):
                bad.append(f"{where}: {target} is in no layer")
            elif other != me and LAYERS[other] >= LAYERS[me]:
                bad.append(f"{where}: layer {me} ({LAYERS[me]}) may not import {other} "
                           f"({LAYERS[other]})")  # fmt: skip
    return bad


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_import_points_down():
    bad = [v for p in package_files() for v in violations(p, p.read_text())]
    assert not bad, "\n".join(bad)


def test_every_folder_and_top_module_is_a_layer():
    names = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in package_files()}
    names -= {"__init__", *(a.split(".")[1] for a in ALIASES)}
    assert names == set(LAYERS), names ^ set(LAYERS)


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        (
            "polydet/eval/evaluate.py",
            "def f():\n    from polydet.tracking import x\n",
            "layer eval",
        ),
        ("polydet/model/detector.py", "from polydet.data import dataset\n", "layer model"),
        ("polydet/geometry/ops.py", "from polydet import polybox\n", "use polydet.geometry"),
        ("polydet/cli.py", "import flows.pipeline\n", "never imports flows"),
        ("polydet/newthing/x.py", "from polydet.core import errors\n", "in no layer"),
    ],
)
def test_the_check_catches_upward_and_sideways_imports(path, source, expected):
    """The checker itself: each of these imports is reported (so a pass above means something)."""
    (found,) = violations(ROOT / path, source)
    assert expected in found


def test_down_and_same_folder_imports_pass():
    source = "from polydet.core.config import Config\nfrom polydet.train import checkpoint\n"
    assert violations(ROOT / "polydet/train/engine.py", source) == []


def test_every_module_imports_alone_and_aliases_are_the_same_module():
    """In a fresh interpreter: every module imports (no cycle at import time), the public
    paths name the very modules they alias, and importing the package or flows/ sets no
    Prefect home (only running an entry point does)."""
    modules = [module_name(p) for p in package_files()]
    code = (
        "import importlib, os, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"for old, new in {ALIASES!r}.items():\n"
        "    assert importlib.import_module(old) is sys.modules[new], old\n"
        "    assert importlib.import_module(old).__name__ == new, old\n"
        "assert 'flows' not in sys.modules\n"
        "assert 'PREFECT_HOME' not in os.environ, os.environ['PREFECT_HOME']\n"
        "import flows.pipeline, flows.serve  # the checkout's entry points, imported\n"
        "assert 'PREFECT_HOME' not in os.environ, os.environ['PREFECT_HOME']\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFECT_HOME"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
