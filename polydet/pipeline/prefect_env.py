"""Prefect's settings for a run started from a project directory, applied before Prefect loads.

Prefect reads its settings once, when it is first imported. :func:`use_project_prefect`
points ``PREFECT_HOME`` (Prefect's database, profiles and logs) at ``./.prefect`` when it is
not set, so that ``polydet pipeline`` or ``python -m flows.pipeline`` never writes into the
user's global ``~/.prefect`` by surprise; a value set by the user or the Makefile wins. The
entry points call it; importing a module never does.
"""

from __future__ import annotations

import os
from pathlib import Path


def use_project_prefect(project: str | Path | None = None) -> None:
    """Default Prefect's home to ``PROJECT/.prefect`` (the working directory by default)."""
    home = Path.cwd() if project is None else Path(project)
    os.environ.setdefault("PREFECT_HOME", str(home.resolve() / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API server takes ~10 s to start on 2 cores; Prefect's default allows 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
