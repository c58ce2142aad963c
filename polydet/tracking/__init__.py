"""MLflow tracking and registry: one run per pipeline run, lineage, model versions, aliases.

The pipeline's record is rebuilt from what the stages wrote to disk, so the Prefect flow and
the DVC ``register`` stage log exactly the same things:

- one parent run per pipeline run (params flattened from ``params.yaml``, lineage tags,
  per-step training metrics, evaluation metrics, every stage's reports as artifacts, system
  metrics when ``psutil`` is present) with one nested run per stage (its summary metrics);
- the model as an ``mlflow.pyfunc`` wrapper (images in, polyboxes out) registered as a new
  version of ``cfg.tracking.model_name`` with the alias ``challenger``; it becomes
  ``champion`` only if its AP50 beats the champion's by ``cfg.tracking.promote_margin``.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``cfg.tracking.default_uri`` (SQLite
inside ``mlruns/``). An unreachable server fails within seconds with a
:class:`~polydet.core.errors.TrackingError` naming the URI, before anything is written to it.

The jobs live in their own modules: :mod:`polydet.tracking.runs` (runs and lineage),
:mod:`polydet.tracking.pyfunc` (the served model), :mod:`polydet.tracking.registry`
(registry and promotion, the ``register`` stage); the store address and the model-URI
download cache are :mod:`polydet.core.store` and :mod:`polydet.core.model_uri` (evaluation
and prediction, below this layer, resolve ``models:/`` URIs too). Their public names are
importable from here: registered models load ``polydet.tracking.PolydetPyfunc`` (the path
baked into every version's code), and scripts use ``polydet.tracking.<name>``. Code inside the
package imports from the defining module.
"""

from polydet.core.files import file_sha256
from polydet.core.model_uri import (
    resolve_model_path,
)
from polydet.core.store import (
    FALLBACK_URI,
    REACH_TIMEOUT_S,
    check_reachable,
    connect,
    get_tracking_uri,
    store_message,
)
from polydet.tracking.pyfunc import (
    MODEL_REQUIREMENTS,
    PolydetPyfunc,
    decode_array,
    decode_image,
    encode_image,
    model_signature,
    serve_command,
    serving_payload,
)
from polydet.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    ap50,
    decide_promotion,
    promote,
    promote_if_better,
    promotion_lock,
    promotion_lock_path,
    record_and_register,
    register_model,
    registration_path,
    rollback,
    run_link,
)
from polydet.tracking.runs import (
    STAGES,
    TAG,
    data_dvc_md5,
    history_metrics,
    launch_tags,
    lineage_tags,
    log_pipeline_outputs,
    numeric_metrics,
    params_hash,
    pipeline_run,
    read_json,
    resolve_device,
    run_name,
    stage_files,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "FALLBACK_URI",
    "MODEL_REQUIREMENTS",
    "PolydetPyfunc",
    "REACH_TIMEOUT_S",
    "STAGES",
    "TAG",
    "ap50",
    "check_reachable",
    "connect",
    "data_dvc_md5",
    "decide_promotion",
    "decode_array",
    "decode_image",
    "encode_image",
    "file_sha256",
    "get_tracking_uri",
    "history_metrics",
    "launch_tags",
    "lineage_tags",
    "log_pipeline_outputs",
    "model_signature",
    "numeric_metrics",
    "params_hash",
    "pipeline_run",
    "promote",
    "promote_if_better",
    "promotion_lock",
    "promotion_lock_path",
    "read_json",
    "record_and_register",
    "register_model",
    "registration_path",
    "resolve_device",
    "resolve_model_path",
    "rollback",
    "run_link",
    "run_name",
    "serve_command",
    "serving_payload",
    "stage_files",
    "store_message",
]
