"""Prefect flows of the polydet pipeline (``flows.pipeline``) and its schedule (``flows.serve``).

Prefect reads its settings once, when it is first imported. Importing this package first
points ``PREFECT_HOME`` (Prefect's database, profiles and logs) at ``./.prefect`` when it is
not set, so that ``python -m flows.pipeline`` or ``polydet pipeline`` never writes into the
user's global ``~/.prefect`` by surprise; a value set by the user or the Makefile wins.
"""

import os

os.environ.setdefault("PREFECT_HOME", os.path.join(os.getcwd(), ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral API server takes ~10 s to start on 2 cores; Prefect's default allows 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
