"""Run the polydet pipeline once: ``python -m flows.pipeline [--params P] [--set K=V] [--smoke]``.

A thin entry point: the flow, its stages and its command line are
:mod:`polydet.pipeline.flow`; ``prefect.yaml`` deploys ``flows/pipeline.py:polydet_pipeline``.
"""

import os
import sys

from polydet.pipeline.prefect_env import use_project_prefect

if __name__ == "__main__":  # before Prefect is imported: it reads its settings once
    use_project_prefect()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from polydet.pipeline.flow import main, polydet_pipeline  # noqa: E402

__all__ = ["main", "polydet_pipeline"]

if __name__ == "__main__":
    sys.exit(main())
