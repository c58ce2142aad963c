"""Serve the pipeline on a cron schedule: ``python -m flows.serve --cron "0 3 * * *"``.

``serve`` registers a deployment of :func:`polydet.pipeline.flow.polydet_pipeline` with the Prefect
API and runs each scheduled run in this process until it is stopped (Ctrl-C). With no
``PREFECT_API_URL`` that API is Prefect's ephemeral local server, which lives as long as
this process; with one, the schedule is visible (and runs can be started) in that server's
UI. For a work pool on a GPU machine, see ``prefect.yaml`` (``prefect deploy``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from polydet.pipeline.prefect_env import use_project_prefect

if __name__ == "__main__":  # before Prefect is imported: it reads its settings once
    use_project_prefect()

from prefect import serve  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402

from polydet.pipeline.flow import polydet_pipeline  # noqa: E402

DEFAULT_NAME = "polydet-nightly"


def build_deployment(
    cron: str, params: str = "params.yaml", overrides: Sequence[str] = (), name: str = DEFAULT_NAME
) -> RunnerDeployment:
    """The pipeline's deployment with a cron schedule (in the server's time zone, UTC)."""
    return polydet_pipeline.to_deployment(
        name=name,
        cron=cron,
        # The deployment's own settings; a run's `overrides` parameter adds to them.
        parameters={"params": params, "deployment_overrides": list(overrides)},
        description="The polydet pipeline: prepare, anchors, train, evaluate, debug, register.",
        tags=["polydet"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--cron", default="0 3 * * *", help='cron schedule (default "0 3 * * *")')
    parser.add_argument("--name", default=DEFAULT_NAME, help="deployment name")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    serve(build_deployment(args.cron, args.params, args.set, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
