"""One record for DVC and the Prefect flow: stages the flow ran are committed to ``dvc.lock``.

The flow (``make demo``) runs the stages itself, for its task cache, retries, logs and
artifacts. After each stage finishes it calls :func:`record_in_dvc`, which does what
``dvc commit`` does: writes the hashes of the stage's deps, params and outs to ``dvc.lock``
and stores the outs in DVC's cache. ``dvc status`` then says the pipeline is up to date and
``dvc repro`` runs nothing, exactly as if ``dvc repro`` had run the stages.

Why commit rather than run the stages through ``dvc repro``: the flow keeps one process (no
re-import of torch per stage, the stage summaries in memory), its own caching and per-task
states; each stage is recorded as soon as it finishes, so a run that fails half way leaves
the stages before the failure up to date in DVC too. Both run the same commands' functions
with the same deps (``tests/test_dvc.py`` checks that ``dvc.yaml`` mirrors the flow).

Only a run whose settings are those of ``params.yaml`` is recorded (``dvc.lock`` would
otherwise claim that ``params.yaml`` produced outputs made with other settings): a run with
``--set``/``--smoke`` overrides leaves ``dvc.lock`` alone and says so.
"""

from __future__ import annotations

from pathlib import Path

from polydet.core.config import Config, ConfigError, flatten, load_config

DVC_PARAMS = "params.yaml"  # the file dvc.yaml's ``params`` read


def why_not_recorded(cfg: Config) -> str | None:
    """``None`` when this run's stages can go to ``dvc.lock``, else the reason they cannot."""
    if not (Path("dvc.yaml").is_file() and Path(".dvc").is_dir()):
        return "no DVC project in the working directory"
    try:
        dvc_cfg = load_config(DVC_PARAMS)
    except ConfigError as e:
        return f"{DVC_PARAMS} cannot be read: {e}"
    ours, theirs = flatten(cfg), flatten(dvc_cfg)
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        return f"this run's settings differ from {DVC_PARAMS} ({shown})"
    return None


def record_in_dvc(cfg: Config, target: str) -> str:
    """Commit ``target`` (a ``dvc.yaml`` stage name, or a ``.dvc`` file) to DVC; one log line.

    A stage is committed as run (its deps are what it just read). A ``.dvc`` file is only
    committed when its data still has the recorded hash (it then goes into DVC's cache):
    data that differs is the user's to record with ``dvc add``.
    """
    reason = why_not_recorded(cfg)
    if reason is not None:
        return f"dvc.lock: {target} not recorded: {reason}"
    stage = not target.endswith(".dvc")
    try:
        from dvc.repo import Repo

        with Repo(".") as repo:
            spec = f"dvc.yaml:{target}" if stage else target
            # relink=False: the workspace files stay as written (no copy back from the cache).
            repo.commit(spec, force=stage, relink=False)
    except Exception as e:  # DVC raises many types; none of them must fail the pipeline
        if not stage and "unable to commit" in str(e):
            return f"dvc: the data differs from what {target} records (`dvc add` records it)"
        return f"dvc.lock: {target} not recorded ({type(e).__name__}: {e})"
    return f"dvc.lock: {target} recorded" if stage else f"dvc: {target} data in DVC's cache"
