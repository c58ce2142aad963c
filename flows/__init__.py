"""Prefect entry points of the polydet pipeline, for a source checkout: ``python -m
flows.pipeline`` (one run) and ``python -m flows.serve`` (a schedule); ``prefect.yaml`` names
``flows/pipeline.py:polydet_pipeline``. The flow itself lives in :mod:`polydet.pipeline.flow`
(``polydet pipeline`` runs it from an installed package); this directory is not installed.
"""
