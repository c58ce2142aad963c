"""The polydet pipeline as one Prefect flow: prepare → anchors → train → evaluate → debug →
register (and promote when the gate passes).

Each stage is one cached task around its library function (docs/CONTRACTS.md). A stage's
cache key is the hash of its settings (the ``params.yaml`` keys it reads), the content of
the files it reads and of its source code, so a second run with nothing changed reruns
nothing; results are persisted inside the project (``.prefect/results``). The same table
(:data:`polydet.stages.table.STAGES`) generates ``dvc.yaml`` (``polydet dvc-yaml``).

Without ``PREFECT_API_URL`` the flow runs on Prefect's ephemeral local API; with it, against
that server. MLflow is checked before any stage runs, so an unreachable tracking server
fails the run within seconds.

``python -m flows.pipeline`` (``make demo``) runs it once and prints where to look.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

import polydet
from polydet.core.config import Config, ConfigError, load_config, to_dict
from polydet.core.errors import DataError, ModelError, PolydetError
from polydet.core.files import file_sha256
from polydet.core.locks import project_lock
from polydet.pipeline.dvc_record import record_in_dvc
from polydet.stages.table import STAGE_BY_NAME, STAGES, Stage
from polydet.tracking import registry, runs

CACHE_VERSION = "polydet-pipeline-cache/1"  # bump to invalidate every cached stage result
RESULTS_DIR = Path(".prefect") / "results"  # relative to the project (the working directory)

# A pipeline that runs end to end in well under a minute on 2 CPU cores: for smoke tests,
# the tests and the benchmark (``python -m flows.pipeline --smoke``).
SMOKE_OVERRIDES: tuple[str, ...] = (
    "synth.num_images=12",
    "synth.image_width=96",
    "synth.image_height=96",
    "synth.max_objects=3",
    "data.split={train: 0.5, val: 0.25, test: 0.25, seed: 0}",
    "model.fpn_channels=32",
    "model.min_size=96",
    "model.max_size=96",
    "model.trainable_layers=3",
    "model.rpn.pre_nms_top_n_train=200",
    "model.rpn.post_nms_top_n_train=100",
    "model.rpn.pre_nms_top_n_test=100",
    "model.rpn.post_nms_top_n_test=50",
    "model.rpn.batch_size_per_image=64",
    "model.roi.representation_size=64",
    "model.roi.batch_size_per_image=32",
    "model.roi.detections_per_img=20",
    "train.epochs=1",
    "train.max_steps=3",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.checkpoint_every=0",
    "debug.num_images=2",
    "debug.top_n_proposals=10",
)


# --- cache keys ----------------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def file_digest(path: Path) -> str:
    """SHA-256 of a file, memoized on (path, size, mtime) within the process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = file_sha256(path)
    return _DIGESTS[memo]


def path_digest(path: str | Path) -> str:
    """Content hash of a file or a directory tree (names and bytes); ``-`` if absent."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return "-"
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if "__pycache__" in f.parts:
            continue
        h.update(f"{f.relative_to(path).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def config_value(cfg: Config, dotted: str) -> Any:
    """The plain value of ``section.key`` (a whole section for ``section``)."""
    node: Any = to_dict(cfg)
    for part in dotted.split("."):
        node = node[part]
    return node


def project_root() -> Path:
    """The directory holding the ``polydet`` package's sources (a checkout or site-packages):
    a stage's ``code`` paths (``polydet/...``) are hashed there, wherever the project is."""
    return Path(polydet.__file__).resolve().parent.parent


def stage_key(stage: Stage, cfg: Config) -> str:
    """The cache key of ``stage``: hash of its settings, its inputs' and its code's content."""
    h = hashlib.sha256(f"{CACHE_VERSION}\0{stage.name}\n".encode())
    settings = {k: config_value(cfg, k) for k in stage.params}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for dep in stage.deps(cfg):
        h.update(f"\ndep {dep}\0{path_digest(dep)}".encode())
    for src in stage.code:
        h.update(f"\ncode {src}\0{path_digest(project_root() / src)}".encode())
    return f"{stage.name}-{h.hexdigest()}"


def _cache_key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return stage_key(STAGE_BY_NAME[parameters["name"]], parameters["cfg"])


# --- tasks ---------------------------------------------------------------------------------


@task(persist_result=True, cache_key_fn=_cache_key_fn, task_run_name="{name}")
def run_stage(name: str, cfg: Config) -> dict[str, Any]:
    """Run one stage's library function; its summary is the cached result."""
    started = time.perf_counter()
    summary = STAGE_BY_NAME[name].run(cfg)
    print(stage_line(name, summary, False, time.perf_counter() - started))  # the task's log
    return summary


@task(cache_policy=NO_CACHE, task_run_name="synth")
def synthesize(cfg: Config) -> str:
    """Write the synthetic dataset (the default data) where ``data.root`` expects it."""
    from polydet.data.synth import generate

    return str(generate(cfg.synth))


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed registration unless the model or its metrics are what is wrong."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, DataError | ModelError | ConfigError)


# Registering talks to the tracking server: a blip there should not cost the whole run.
@task(
    retries=2,
    retry_delay_seconds=[3, 10],
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,
    task_run_name="register",
)
def register(cfg: Config, cached: dict[str, bool], run_id: str) -> dict[str, Any]:
    """Log every stage's outputs to the MLflow run, register the model, apply the gate."""
    return registry.record_and_register(cfg, cached, run_id=run_id)


def needs_synthetic_data(cfg: Config) -> bool:
    """True when ``data.root`` is absent and is where the synthetic generator writes."""
    root = Path(cfg.data.root)
    return not root.exists() and root.resolve() == Path(cfg.synth.out).resolve()


# --- the flow ------------------------------------------------------------------------------


@flow(name="polydet-pipeline", log_prints=True)
def polydet_pipeline(
    params: str = "params.yaml",
    overrides: Sequence[str] = (),
    deployment_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the whole pipeline once; return the registration record and where to look.

    ``deployment_overrides`` are a deployment's own settings (``prefect.yaml``); the
    ``overrides`` of a run started from it are applied after them, not instead of them.
    """
    from prefect.runtime import flow_run

    with project_lock():  # held already when started by main(); a scheduled run takes it
        return _pipeline_body(load_config(params, [*deployment_overrides, *overrides]), flow_run)


def _pipeline_body(cfg: Config, flow_run: Any) -> dict[str, Any]:
    results = RESULTS_DIR.resolve()
    summaries: dict[str, dict[str, Any]] = {}
    cached: dict[str, bool] = {}
    # Opening the run checks the tracking store first: a dead server fails here, in seconds.
    run_tags = {
        "polydet.orchestrator": "prefect",
        "polydet.prefect_flow_run": str(flow_run.get_id()),
    }
    timing: dict[str, float] = {}  # wall seconds of each step, as the flow saw them
    name = runs.run_name(cfg, f"prefect-{flow_run.get_name()}")
    with runs.pipeline_run(cfg, name, run_tags) as run_id:
        if needs_synthetic_data(cfg):
            started = time.perf_counter()
            synthesize(cfg)
            timing["synth"] = time.perf_counter() - started
        if Path("data.dvc").is_file():  # data/ into DVC's cache when it is what data.dvc says
            print(record_in_dvc(cfg, "data.dvc"))
        for stage in STAGES:
            started = time.perf_counter()
            outputs_present = all(Path(p).exists() for p in stage.outs(cfg))
            state = run_stage.with_options(
                result_storage=results, refresh_cache=not outputs_present
            )(stage.name, cfg, return_state=True)
            summaries[stage.name] = state.result()
            cached[stage.name] = state.name == "Cached"
            if cached[stage.name]:  # no task log then: say it here
                print(stage_line(stage.name, summaries[stage.name], True, 0.0))
            print(record_in_dvc(cfg, stage.name))  # dvc status / dvc repro see the same run
            timing[stage.name] = time.perf_counter() - started
        started = time.perf_counter()
        record = register(cfg, cached, run_id)
        print(record_in_dvc(cfg, "register"))
        timing["register"] = time.perf_counter() - started
    record["timing"] = {k: round(v, 3) for k, v in timing.items()}
    record["run_link"] = registry.run_link(cfg, run_id)
    record["cached"] = cached
    record["outputs"] = outputs_of(cfg)
    _publish(cfg, summaries, record)
    record["where"] = where_to_look(cfg, record)
    return record


def outputs_of(cfg: Config) -> dict[str, str]:
    """The files a person looks at after a run."""
    return {
        "metrics": str(Path(cfg.evaluate.out) / "metrics.json"),
        "report": str(Path(cfg.debug.out) / "report.html"),
        "report_md": str(Path(cfg.debug.out) / "report.md"),
        "anchors": str(Path(cfg.anchors.out) / "report.md"),
        "dataset": str(Path(cfg.data.out) / "stats.md"),
        "registration": str(registry.registration_path(cfg)),
    }


# --- reporting -----------------------------------------------------------------------------


def stage_line(name: str, summary: dict[str, Any], cached: bool, seconds: float) -> str:
    """One log line per stage: how it went and its first few numbers (Prefect's task log)."""
    numbers = [
        f"{k}={_fmt(v)}"
        for k, v in (summary or {}).items()
        if isinstance(v, int | float | str) and not isinstance(v, bool) and len(str(v)) < 40
    ]
    how = "cached" if cached else f"ran in {seconds:.1f} s"
    return f"{name}: {how}; " + (", ".join(numbers[:8]) or "no summary numbers")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def per_class_rows(metrics: dict[str, Any], classes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class with every ``<metric>/<class>`` value of the evaluation."""
    rows = []
    for name in classes:
        row: dict[str, Any] = {"class": name}
        for key, value in metrics.items():
            if key.endswith("/" + name):
                row[key.removesuffix("/" + name)] = value
        rows.append(row)
    return rows


def import_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The import summary (``import_summary.json``) as ``{"item", "count"}`` rows."""
    rows: list[dict[str, Any]] = []
    for section in ("images", "objects"):
        counts = summary.get(section) or {}
        for key, value in counts.items():
            if isinstance(value, dict):  # {reason: count} of a repair / drop kind
                kind = key.removesuffix("_by_reason")
                rows += [{"item": f"{section} {kind}: {r}", "count": n} for r, n in value.items()]
            else:
                rows.append({"item": f"{section} {key}", "count": value})
    for reason, n in (summary.get("warnings_by_reason") or {}).items():
        rows.append({"item": f"warning: {reason}", "count": n})
    if "num_issues" in summary:
        rows.append({"item": "issues (see import_issues.txt)", "count": summary["num_issues"]})
    return rows


def _views(count: Any) -> str:
    """How many test-time-augmentation views an evaluation ran (``tta_views``)."""
    n = int(count or 1)
    return "the model alone" if n == 1 else f"test-time augmentation: {n} views"


def summary_markdown(cfg: Config, summaries: dict[str, dict[str, Any]], record: dict) -> str:
    """The run's Markdown summary: metrics, anchor coverage, debug findings, MLflow links."""
    metrics = runs.read_json(Path(cfg.evaluate.out) / "metrics.json")
    headline = [
        k
        for k in ("map50", "map50_95", "map75", "recall75", "mar100", "map_voc_all")
        if k in metrics
    ]
    lines = [
        f"# polydet pipeline — {cfg.tracking.model_name} v{record['version']}",
        "",
        f"**{cfg.evaluate.split} AP50 {_fmt(record['map50'])}, "
        f"AP75 {_fmt(metrics.get('map75'))}**; "
        f"promotion: {record['promotion']['reason']}.",
        "",
        f"This model: `models:/{cfg.tracking.model_name}/{record['version']}`; the champion is "
        f"v{record.get('champion')} (`models:/{cfg.tracking.model_name}@champion`).",
        "",
        f"MLflow run: [{record['run_id']}]({record['run_link']}) in `{record['tracking_uri']}`"
        + (
            ""
            if record["tracking_uri"].startswith(("http://", "https://"))
            else " (the link works while `make ui` serves that store)"
        )
        + ".",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {cfg.evaluate.split} {k} | {_fmt(metrics[k])} |" for k in headline),
        "",
        "## Stages",
        "",
        "| stage | cached |",
        "| --- | --- |",
        *(f"| {s} | {'yes' if c else 'no'} |" for s, c in record["cached"].items()),
        "",
        "## Anchor coverage",
        "",
    ]
    lines += anchor_lines(runs.read_json(Path(cfg.anchors.out) / "coverage.json"))
    lines += ["", "## Debug report findings", ""]
    debug = summaries.get("debug") or runs.read_json(Path(cfg.debug.out) / "debug.json")
    findings = debug.get("findings") or []
    lines += [f"- {_finding(f)}" for f in findings] or ["- no findings"]
    lines += ["", f"Full report: `{Path(cfg.debug.out) / 'report.html'}`"]
    return "\n".join(lines) + "\n"


def anchor_lines(coverage: dict[str, Any]) -> list[str]:
    """Markdown lines on the chosen anchor set's coverage of the ground truths."""
    chosen = coverage.get("chosen")
    overall = (coverage.get("sets") or {}).get(chosen, {}).get("overall")
    if not overall:
        return ["- (no coverage report)"]
    lines = [f"- anchor set: {chosen}, {overall.get('count')} training objects"]
    # Code spans: Markdown renderers turn a bare "coverage@0.5" into a mailto link.
    lines += [f"- `{k}`: {_fmt(v)}" for k, v in overall.items() if k != "count"]
    lines.append(f"- unreachable (best IoU < 0.5): {len(coverage.get('unreachable') or [])}")
    return lines


def _finding(f: Any) -> str:
    if isinstance(f, dict):
        return " — ".join(str(v) for v in f.values())
    return str(f)


def _publish(cfg: Config, summaries: dict[str, dict[str, Any]], record: dict) -> None:
    """Prefect artifacts: the Markdown summary and the per-class AP and import tables."""
    create_markdown_artifact(
        summary_markdown(cfg, summaries, record),
        key="polydet-summary",
        description="polydet pipeline: metrics, anchors, debug findings, MLflow links",
    )
    metrics = runs.read_json(Path(cfg.evaluate.out) / "metrics.json")
    rows = per_class_rows(metrics, cfg.data.classes)
    create_table_artifact(
        [{k: _fmt(v) for k, v in r.items()} for r in rows],
        key="per-class-ap",
        description=f"per-class AP on the {cfg.evaluate.split} split",
    )
    imports = import_rows(runs.read_json(Path(cfg.data.out) / "import_summary.json"))
    if imports:
        create_table_artifact(imports, key="import-summary", description="dataset import")


def where_to_look(cfg: Config, record: dict[str, Any]) -> str:
    """The closing message of a run: metrics, report, MLflow UI, the model and its alias."""
    out = outputs_of(cfg)
    uri = record["tracking_uri"]
    ui = (
        f"open {uri}"
        if uri.startswith(("http://", "https://"))
        else f"make ui   (= mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000)"
    )
    name, version = cfg.tracking.model_name, record["version"]
    metrics_path = Path(cfg.evaluate.out) / "metrics.json"
    metrics = runs.read_json(metrics_path) if metrics_path.is_file() else {}
    aliases = [a for a, v in (("champion", record.get("champion")),) if v == version]
    state = "new version" if record["new"] else "unchanged, already registered"
    return "\n".join(
        [
            "polydet pipeline finished. Where to look:",
            f"  metrics   {out['metrics']}  ({cfg.evaluate.split} AP50 {_fmt(record['map50'])}, "
            f"AP75 {_fmt(metrics.get('map75'))}; recall at IoU 0.75: "
            f"{_fmt(metrics.get('recall75'))}; {_views(metrics.get('tta_views'))})",
            f"  report    {out['report']}  (and {out['report_md']}; anchors: {out['anchors']})",
            f"  MLflow    {ui}",
            f"            run {record['run_link']}",
            f"  model     {name} v{version} ({state}; champion is v{record.get('champion')}"
            f"{', this one' if aliases else ''}): {record['promotion']['reason']}",
            f"            polydet predict IMAGE --model models:/{name}@champion",
            "            polydet serve   (HTTP on 127.0.0.1:5001; README: Serving), i.e.",
            f"            MLFLOW_TRACKING_URI={uri} mlflow models serve "
            f"-m models:/{name}@champion --env-manager local -h 127.0.0.1 -p 5001",
        ]
    )


# --- command line --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.pipeline [--params P] [--set K=V ...] [--smoke]``."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny configuration that runs in a minute"
    )
    args = parser.parse_args(argv)
    overrides = [*(SMOKE_OVERRIDES if args.smoke else ()), *args.set]
    try:
        # Before Prefect starts: a second run must not even touch .prefect's database.
        with project_lock():
            record = polydet_pipeline(params=args.params, overrides=overrides)
    except PolydetError as e:
        print(f"polydet pipeline: error: {e}", file=sys.stderr)
        return 2
    print(record["where"])
    return 0
