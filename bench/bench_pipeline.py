"""Overhead of the orchestrated pipeline over the same stage functions called directly.

Both modes run in their own process and their own empty directory, on the same settings
(the smoke configuration by default, ``--demo`` for params.yaml as it is):

- ``direct``: synth → prepare → anchors → train → evaluate → debug as plain calls;
- ``flow``: ``polydet_pipeline`` — Prefect (ephemeral API server, cached tasks, artifacts),
  MLflow (SQLite store, run, metrics, artifacts, pyfunc model, registry, promotion) — and
  then a second, fully cached run.

Prints the wall times (imports excluded, reported apart), the overhead ratio flow / direct
and the fixed costs that make up the difference. Usage::

    python bench/bench_pipeline.py [--demo] [--set SECTION.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_direct(params: str, overrides: list[str]) -> dict[str, float]:
    """The stage functions one after the other, no orchestration, no tracking."""
    t0 = time.perf_counter()
    from polydet.core.config import load_config
    from polydet.data.prepare import prepare
    from polydet.data.synth import generate
    from polydet.debug.report import debug_report
    from polydet.eval.evaluate import evaluate_model
    from polydet.train.anchors import configure_anchors
    from polydet.train.engine import train

    imports = time.perf_counter() - t0
    cfg = load_config(params, overrides)
    times: dict[str, float] = {"imports": imports}
    start = time.perf_counter()
    for name, step in [
        ("synth", lambda: generate(cfg.synth)),
        ("prepare", lambda: prepare(cfg)),
        ("anchors", lambda: configure_anchors(cfg)),
        ("train", lambda: train(cfg)),
        ("evaluate", lambda: evaluate_model(cfg)),
        ("debug", lambda: debug_report(cfg)),
    ]:
        t = time.perf_counter()
        step()
        times[name] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    return times


def run_flow(params: str, overrides: list[str]) -> dict[str, float]:
    """The Prefect flow (with MLflow), then the same flow again with nothing changed."""
    t0 = time.perf_counter()
    import polydet.data.prepare  # noqa: F401
    import polydet.debug.report  # noqa: F401
    import polydet.eval.evaluate  # noqa: F401
    import polydet.train.anchors  # noqa: F401  (the same imports as the direct mode, timed apart)
    import polydet.train.engine  # noqa: F401
    from polydet.pipeline.flow import polydet_pipeline

    imports = time.perf_counter() - t0
    start = time.perf_counter()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # starts the ephemeral API server
        client.hello()
    server = time.perf_counter() - start
    record = polydet_pipeline(params=params, overrides=overrides)
    total = time.perf_counter() - start
    start = time.perf_counter()
    again = polydet_pipeline(params=params, overrides=overrides)
    assert all(again["cached"].values()), again["cached"]
    stages = sum(v for k, v in record["timing"].items() if k != "register")
    return {
        "imports": imports,
        "server_start": server,
        "total": total,
        "stages": stages,
        "register": record["timing"]["register"],
        "cached_rerun": time.perf_counter() - start,
    }


def _child(mode: str, params: str, overrides: list[str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    with tempfile.TemporaryDirectory(prefix=f"polydet-bench-{mode}-") as tmp:
        env |= {
            "PYTHONPATH": str(ROOT),
            "PREFECT_HOME": str(Path(tmp) / ".prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        args = [sys.executable, __file__, "--child", mode, "--params", params]
        done = subprocess.run(
            [*args, *(f"--set={o}" for o in overrides)],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        sys.exit(f"{mode} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo", action="store_true", help="params.yaml as is: the demo (tens of minutes)"
    )
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--child", choices=["direct", "flow"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = run_direct if args.child == "direct" else run_flow
        print(json.dumps(run(args.params, args.set)))
        return

    from polydet.pipeline.flow import SMOKE_OVERRIDES

    overrides = [*([] if args.demo else SMOKE_OVERRIDES), *args.set]
    label = "demo (params.yaml)" if args.demo else "smoke (flows.pipeline.SMOKE_OVERRIDES)"
    direct = _child("direct", args.params, overrides)
    flow = _child("flow", args.params, overrides)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in direct.items() if k not in ("total",))
    print(f"configuration: {label}")
    print(f"direct stage calls : {direct['total']:7.1f} s   ({stages})")
    print(
        f"Prefect+MLflow flow: {flow['total']:7.1f} s   (imports {flow['imports']:.1f}s; "
        f"cached rerun {flow['cached_rerun']:.1f} s)"
    )
    # The flow's own overhead: its wall time outside the stage functions (Prefect's API
    # server, MLflow's run and registration, task bookkeeping). Measured inside one process,
    # it does not depend on how the two processes' stage times happen to differ.
    overhead = flow["total"] - flow["stages"]
    print(
        f"flow overhead      : {overhead:7.1f} s   (Prefect API server start "
        f"{flow['server_start']:.1f}s, MLflow logging + registration {flow['register']:.1f}s, "
        f"the rest {overhead - flow['server_start'] - flow['register']:.1f}s)"
    )
    print(f"ratio flow/direct  : {flow['total'] / direct['total']:7.2f}  (wall times as measured)")
    print(
        f"ratio (overhead)   : {(direct['total'] + overhead) / direct['total']:7.2f}  "
        "(direct + flow overhead) / direct; target <= 1.10 on the demo configuration"
    )


if __name__ == "__main__":
    main()
