"""Two ``register`` runs finishing together must not both be crowned (survey case 1).

Two processes apply the promotion gate at the same moment against the same SQLite store;
a pause between reading the champion and setting the alias (the slower process pauses
longer) opens the window the survey hit. The better model must end as champion, and what
each process reports must agree with the registry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from polydet.tracking import registry as tracking
from polydet.core.config import load_config

pause = float(sys.argv[3])
real = tracking._version_ap
def slow_version_ap(client, name, version):
    value = real(client, name, version)
    time.sleep(pause)  # between reading the champion and setting the alias
    return value
tracking._version_ap = slow_version_ap
cfg = load_config({params!r}, ["tracking.default_uri=" + sys.argv[1]])
import mlflow
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])
go = Path(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
result = tracking.promote_if_better(cfg, sys.argv[2], float(sys.argv[5]))
print(json.dumps(result))
"""


def test_two_processes_promoting_at_once_crown_the_better_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_db: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_db, db)
    uri = f"sqlite:///{db}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("polydet")
    source = tmp_path / "artifact"
    source.mkdir()
    for ap in ("0.50", "0.95", "0.60"):  # v1 the champion, v2 and v3 the challengers
        v = client.create_model_version("polydet", str(source)).version
        client.set_model_version_tag("polydet", v, "polydet.map50", ap)
    client.set_registered_model_alias("polydet", "champion", "1")

    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), params=str(ROOT / "params.yaml")))
    go = tmp_path / "go"
    # v2 (0.95) pauses briefly, v3 (0.60) longer: without a lock v3 would be crowned last.
    runs = {"2": ("0.3", "0.95"), "3": ("1.5", "0.60")}
    procs = {
        v: subprocess.Popen(
            [sys.executable, str(script), uri, v, pause, str(go), ap],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for v, (pause, ap) in runs.items()
    }
    time.sleep(0.2)
    go.touch()
    results = {}
    for v, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results[v] = json.loads(out.strip().splitlines()[-1])

    champion = client.get_model_version_by_alias("polydet", "champion").version
    assert str(champion) == "2"
    assert results["2"]["promoted"] is True
    # v3 was either refused, or crowned first (over v1) and then replaced by v2.
    if results["3"]["promoted"]:
        assert results["3"]["previous_champion"] == "1"
        assert client.get_model_version("polydet", "3").tags["polydet.replaced_by"] == "2"
        assert results["2"]["previous_champion"] == "3"
    else:
        assert results["2"]["previous_champion"] == "1"
        assert "does not beat champion's 0.9500" in results["3"]["reason"]
