"""Layer 7, the pipeline: the Prefect flow and its stages (:mod:`~polydet.pipeline.flow`),
DVC bookkeeping (:mod:`~polydet.pipeline.dvc_record`) and Prefect's local settings
(:mod:`~polydet.pipeline.prefect_env`). Nothing is imported here."""
