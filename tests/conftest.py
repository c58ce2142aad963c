"""Test-session settings: every tool's state in a temp dir, no telemetry, no network waits."""

import atexit
import os
import shutil
import tempfile

_TMP = tempfile.mkdtemp(prefix="polydet-tests-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
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


# --- Prefect: one test server for the whole session (starting one takes ~10 s) ------------

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402  (after the environment above, which Prefect reads on import)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """A Prefect API on a temporary database for the session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield PREFECT_API_URL.value()


# --- MLflow: an empty store, migrated once (creating the schema takes a few seconds) ------


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite database; copy it to ``mlruns/mlflow.db`` for a fresh store."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path
