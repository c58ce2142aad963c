"""The pipeline's stages, written once: what each runs, reads, writes, shows and logs.

Every consumer reads this table: the Prefect flow (:mod:`polydet.pipeline.flow`: the tasks
and their cache keys), ``dvc.yaml`` (generated from it by ``polydet dvc-yaml``; a test checks
the committed file equals the generated one) and the MLflow runs
(:mod:`polydet.tracking.runs`: one nested run per stage, its summary and artifacts). A new
stage is one more :class:`Stage` row here, plus its library function and ``polydet``
subcommand; then ``polydet dvc-yaml``.

The ``run`` functions import their stage lazily, so reading the table (e.g. to write
``dvc.yaml``) does not load torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polydet.core.config import Config


@dataclass(frozen=True)
class Out:
    """One output as ``dvc.yaml`` declares it."""

    path: str
    cache: bool = True  # False: not in DVC's cache (nor its run cache)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: what it reads, what it writes, what it runs."""

    name: str
    params: tuple[str, ...]  # params.yaml keys it depends on (dvc.yaml's ``params``)
    deps: Callable[[Config], list[str]]  # files / directories it reads
    outs: Callable[[Config], list[str]]  # files a cached result needs to still exist
    code: tuple[str, ...]  # its source files / packages (dvc.yaml's code ``deps``)
    run: Callable[[Config], dict[str, Any]]
    # What DVC tracks (dvc.yaml ``outs`` and ``metrics``) and draws (top-level ``plots``).
    dvc_outs: Callable[[Config], list[Out]] = lambda c: []
    metrics: Callable[[Config], list[str]] = lambda c: []
    plots: Callable[[Config], list[Any]] = lambda c: []
    # What MLflow logs: the summary file (its numbers become metrics) and the output
    # directory (its files become artifacts under ``<stage>/``), minus large or versioned ones.
    summary: Callable[[Config], Path] = lambda c: Path()
    artifacts: Callable[[Config], Path] = lambda c: Path()
    skip_artifacts: tuple[str, ...] = field(default=())


def _prepared(cfg: Config, *names: str) -> list[str]:
    return [str(Path(cfg.data.out) / n) for n in names]


def _in(directory: str, *names: str) -> list[Out]:
    return [Out(str(Path(directory) / n)) for n in names]


def _run_prepare(cfg: Config) -> dict[str, Any]:
    from polydet.data.prepare import prepare

    return prepare(cfg)


def _run_anchors(cfg: Config) -> dict[str, Any]:
    from polydet.train.anchors import configure_anchors

    return configure_anchors(cfg)


def _run_train(cfg: Config) -> dict[str, Any]:
    from polydet.train.engine import train

    return train(cfg)


def _run_evaluate(cfg: Config) -> dict[str, Any]:
    from polydet.eval.evaluate import evaluate_model

    return evaluate_model(cfg)


def _run_debug(cfg: Config) -> dict[str, Any]:
    from polydet.debug.report import debug_report

    return debug_report(cfg)


_CORE = ("polydet/geometry", "polydet/core/config.py", "polydet/core/files.py")  # every stage
_MODEL = ("polydet/model",)  # the detector
_EVALUATE = ("polydet/eval",)

# One kind of row each (train / validation), so that each loss is one line per split.
_LOSSES = ("loss", "loss_rpn_objectness", "loss_rpn_polybox", "loss_classifier", "loss_polybox")


def _train_plots(c: Config) -> list[Any]:
    train, val = (str(Path(c.train.out) / f"history_{s}.csv") for s in ("train", "val"))
    return [
        {"loss": {"template": "linear", "x": "step", "y": {train: list(_LOSSES), val: ["loss"]}}},
        {"learning_rate": {"template": "linear", "x": "step", "y": {train: "lr"}}},
    ]


def _evaluate_plots(c: Config) -> list[Any]:
    out = Path(c.evaluate.out)
    pr = {"template": "scatter", "x": "recall", "y": {str(out / "pr.csv"): "precision"}}
    return [
        {"precision_recall": pr},
        *(str(out / f"{n}.png") for n in ("pr_curves", "score_hist", "confusion")),
    ]


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        ("data",),
        lambda c: [c.data.root],
        lambda c: _prepared(c, "images.csv", "objects.csv"),
        ("polydet/data", *_CORE),
        _run_prepare,
        dvc_outs=lambda c: [Out(c.data.out)],
        summary=lambda c: Path(c.data.out) / "stats.json",
        artifacts=lambda c: Path(c.data.out),
        skip_artifacts=("images.csv", "objects.csv", "tiles"),
    ),
    Stage(
        "anchors",
        # The anchor grid's strides come from the backbone; sizes are in model input pixels.
        ("anchors", "model.backbone", "model.returned_layers", "model.min_size", "model.max_size"),
        lambda c: _prepared(c, "images.csv", "objects.csv"),
        lambda c: [str(Path(c.anchors.out) / "anchors.json")],
        ("polydet/train/anchors.py", "polydet/model", "polydet/data", *_CORE),
        _run_anchors,
        dvc_outs=lambda c: _in(
            c.anchors.out, "anchors.json", "report.md", "coverage.png", "coverage.json"
        ),
        summary=lambda c: Path(c.anchors.out) / "coverage.json",
        artifacts=lambda c: Path(c.anchors.out),
    ),
    Stage(
        "train",
        # The model section's derived keys: its classes and (without anchors.json) anchors.
        ("model", "train", "data.classes", "anchors.sizes", "anchors.aspect_ratios"),
        lambda c: [
            *_prepared(c, "images.csv", "objects.csv", "tiles"),
            c.data.root,
            str(Path(c.anchors.out) / "anchors.json"),
        ],
        lambda c: [str(Path(c.train.out) / n) for n in ("model.pt", "history.csv")],
        (
            "polydet/train/engine.py",
            "polydet/train/anchors.py",  # anchors.json is read there
            "polydet/train/checkpoint.py",
            "polydet/train/distributed.py",
            "polydet/train/ema.py",
            *_MODEL,
            "polydet/data",
            *_CORE,
        ),
        _run_train,
        dvc_outs=lambda c: _in(
            c.train.out,
            "model.pt",
            "checkpoints",
            "summary.json",
            "history.csv",
            "history_train.csv",
            "history_val.csv",
        ),
        plots=_train_plots,
        summary=lambda c: Path(c.train.out) / "summary.json",
        artifacts=lambda c: Path(c.train.out),
        skip_artifacts=("model.pt", "checkpoints"),
    ),
    Stage(
        "evaluate",
        ("evaluate",),
        lambda c: [
            str(Path(c.train.out) / "model.pt"),
            *_prepared(c, "images.csv", "objects.csv", "tiles"),
            c.data.root,
        ],
        lambda c: [str(Path(c.evaluate.out) / "metrics.json")],
        (*_EVALUATE, *_MODEL, "polydet/train/checkpoint.py", "polydet/data", *_CORE),
        _run_evaluate,
        dvc_outs=lambda c: _in(
            c.evaluate.out,
            "detections",
            "confusion.json",
            "metrics.json",  # every number, per class and size (wide)
            "pr.csv",
            "pr_curves.png",
            "score_hist.png",
            "confusion.png",
        ),
        metrics=lambda c: [str(Path(c.evaluate.out) / "headline.json")],  # map50, map75, ...
        plots=_evaluate_plots,
        summary=lambda c: Path(c.evaluate.out) / "metrics.json",
        artifacts=lambda c: Path(c.evaluate.out),
    ),
    Stage(
        "debug",
        # The report judges detections as the evaluation does, with its settings.
        ("debug", "evaluate.iou_threshold", "evaluate.score_thresh"),
        lambda c: [
            str(Path(c.train.out) / "model.pt"),
            str(Path(c.train.out) / "history.csv"),
            *_prepared(c, "images.csv", "objects.csv", "tiles"),
            c.data.root,
        ],
        lambda c: [str(Path(c.debug.out) / "report.md")],
        (
            "polydet/debug",
            *_EVALUATE,
            *_MODEL,
            "polydet/train/checkpoint.py",  # model files are written and read through it
            "polydet/data",
            *_CORE,
        ),
        _run_debug,
        dvc_outs=lambda c: [Out(c.debug.out)],
        summary=lambda c: Path(c.debug.out) / "debug.json",
        artifacts=lambda c: Path(c.debug.out),
    ),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}
