"""polydet: two-stage quadrilateral ("polybox") detectors with a Prefect / DVC / MLflow pipeline.

The package's folders are its layers, each importing only the ones below it (README, "How
the code is laid out"; ``tests/test_layers.py``): ``core`` → ``geometry`` → ``model``,
``data`` → ``eval`` → ``train`` → ``deploy``, ``debug`` → ``stages`` → ``tracking`` →
``pipeline`` → ``cli``.

The public paths of the design (``polydet.polybox``, ``polydet.ops``, ``polydet.coder``,
``polydet.config``) name the modules that now live in ``geometry/`` and ``core/``: importing
one returns that very module object (not a copy re-exporting its names), so functions,
private names, ``isinstance`` and monkeypatching agree whichever path a caller uses. The
alias is resolved on first import only, so ``import polydet`` stays free of torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

ALIASES = {
    "polydet.polybox": "polydet.geometry.polybox",
    "polydet.ops": "polydet.geometry.ops",
    "polydet.coder": "polydet.geometry.coder",
    "polydet.config": "polydet.core.config",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports each old public path as the module it names (see the module docstring)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname not in ALIASES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(ALIASES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was executed under its own name."""


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
