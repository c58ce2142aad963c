"""Layer 6, the stage table (:mod:`~polydet.stages.table`): one row per pipeline stage, read
by the Prefect flow, the MLflow stage runs and the ``dvc.yaml`` generator. It sits above the
stages' own layers (it runs them) and below tracking (which logs what it names).
Nothing is imported here."""
