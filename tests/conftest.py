"""Test-session settings: every tool's state in a temp dir, no telemetry, no network waits."""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="polydet-tests-")
for key, value in {
    "PREFECT_HOME": os.path.join(_TMP, "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "TORCH_HOME": os.path.join(_TMP, "torch"),
    "GIT_PYTHON_REFRESH": "quiet",
}.items():
    os.environ[key] = value
