"""Debugging reports: why does a detector not learn?

``debug_report(cfg, model)`` writes one self-contained report for a model and a dataset
split (``report.md`` with PNG plots, ``report.html`` with the plots embedded, and the
numbers as ``debug.json``) under ``cfg.debug.out``. It covers:

- **Loss design** (``history.csv`` / ``nonfinite.json`` of ``cfg.train.out``): each loss
  term over the steps, train and validation; each term's share of the total; when and
  where a loss became non-finite.
- **Matching and IoU** (``PolyDetector.inspect`` on ``cfg.debug.num_images`` images): per
  ground truth its positive anchors and best anchor IoU (hull box IoU, as the RPN matches);
  ground truths without a positive anchor (with size and aspect); IoU histograms of
  positive and negative anchors; RPN recall of the ground truths by the top-N proposals.
- **Encoding**: mean and standard deviation of the 10 encoded target terms of positive
  anchors and RoIs, and of the predicted deltas (targets should sit near 0, unit-ish scale).
- **Drawn examples**: ground truths, each one's best anchor, top proposals and detections;
  the worst false positives and the missed objects.
- **Findings**: known pathologies flagged automatically (:class:`Thresholds`).

The analysis (``analyze_*``: tensors, inspect-dicts and tables in, numbers and findings out)
lives in :mod:`polydet.debug.analysis`, the drawing (``plot_*``, ``draw_*``) in
:mod:`polydet.debug.plots`, and the report writing here, so that the findings can be tested
without a trained model; import them from there.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polydet.core.config import Config
from polydet.core.errors import DataError
from polydet.debug.analysis import (
    ENCODING_GROUPS,
    MAX_LISTED,
    TERMS,
    Finding,
    Thresholds,
    analyze_encoding,
    analyze_losses,
    analyze_matching,
    dataset_findings,
    read_history,
)
from polydet.debug.plots import (
    DRAWN_IMAGES,
    DRAWN_PROPOSALS,
    draw_examples,
    draw_worst,
    plot_encoding,
    plot_losses,
    plot_matching,
    plot_objectness,
)
from polydet.eval import evaluate as ev
from polydet.eval.metrics import evaluate_detections

__all__ = [
    "debug_report",
    "render_html",
    "render_markdown",
]

# --- the report --------------------------------------------------------------------------------


Block = tuple[str, Any]  # ("h1"|"h2"|"p"|"ul"|"table"|"img", content)


def render_markdown(blocks: Sequence[Block], base: Path) -> str:
    """Markdown of report blocks; images are linked relative to ``base`` (the report's
    directory)."""
    out = []
    for kind, c in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + c)
        elif kind == "p":
            out.append(c)
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in c))
        elif kind == "table":
            head, *rows = c
            out.append(
                "\n".join(
                    ["| " + " | ".join(map(str, head)) + " |", "|" + " --- |" * len(head)]
                    + [
                        "| " + " | ".join(_cell(v).replace("|", "\\|") for v in r) + " |"
                        for r in rows
                    ]
                )
            )
        elif kind == "img":
            out.append(f"![{c.stem}]({c.relative_to(base).as_posix()})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A single HTML file: images embedded as base64 PNG (self-contained)."""
    body = []
    for kind, c in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(c)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(c)}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in c) + "</ul>")
        elif kind == "table":
            head, *rows = c
            th_ = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
            tr = "".join(
                "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r) + "</tr>"
                for r in rows
            )
            body.append(f"<table><tr>{th_}</tr>{tr}</table>")
        elif kind == "img":
            data = base64.b64encode(c.read_bytes()).decode("ascii")
            body.append(
                f'<p><img alt="{html.escape(c.stem)}" src="data:image/png;base64,{data}"></p>'
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:right}img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer | np.floating):
        return x.item()
    if isinstance(x, np.ndarray | Tensor):
        return x.tolist()
    return str(x)


ICONS = {"error": "ERROR", "warning": "WARNING", "info": "info"}


def _report_blocks(
    title: str,
    findings: Sequence[Finding],
    losses: dict[str, Any],
    matching: dict[str, Any] | None,
    encoding: dict[str, Any] | None,
    plots: dict[str, Path | None],
    examples: Sequence[Path],
) -> list[Block]:
    blocks: list[Block] = [("h1", title), ("h2", "Findings")]
    if findings:
        blocks.append(("ul", [f"{ICONS[f.severity]} [{f.code}] {f.message}" for f in findings]))
    else:
        blocks.append(("p", "No known pathology detected."))
    blocks.append(("h2", "Loss design"))
    if losses.get("terms"):
        rows = [["term", "early", "late", "best", "best step", "late share", "val last"]]
        for c, s in losses["terms"].items():
            rows.append(
                [
                    c,
                    s["early"],
                    s["late"],
                    s["best"],
                    s["best_step"],
                    s.get("late_share"),
                    s.get("val_last"),
                ]
            )
        blocks.append(("table", rows))
    else:
        blocks.append(("p", "No training history (history.csv) was found."))
    if plots.get("losses"):
        blocks.append(("img", plots["losses"]))
    if matching is not None:
        blocks.append(("h2", "Matching and IoU"))
        ppg = matching["positives_per_gt"]
        blocks.append(
            (
                "table",
                [
                    [
                        "images",
                        "ground truths",
                        "positives / image",
                        "positives / GT (median)",
                        "best anchor IoU (mean)",
                        f"GT below fg {matching['fg_iou_thresh']}",
                        f"GT below bg {matching['bg_iou_thresh']}",
                    ],
                    [
                        matching["images"],
                        matching["ground_truths"],
                        matching["positives_per_image"],
                        ppg["median"],
                        matching["best_anchor_iou"]["mean"],
                        matching["best_anchor_iou"]["below_fg"],
                        matching["best_anchor_iou"]["below_bg"],
                    ],
                ],
            )
        )
        weak = [
            r
            for r in matching["ground_truth_table"]
            if r["positives"] == 0 or r["best_anchor_iou"] < matching["fg_iou_thresh"]
        ]
        if weak:
            blocks.append(
                ("h3", "Ground truths without a positive anchor, or below the fg threshold")
            )
            keys = [
                "image_id",
                "index",
                "class",
                "width",
                "height",
                "aspect",
                "best_anchor_iou",
                "positives",
            ]
            blocks.append(("table", [keys] + [[r[k] for k in keys] for r in weak[:MAX_LISTED]]))
        keys = [
            "image_id",
            "ground_truths",
            "positives",
            "negatives",
            "ignored",
            "proposals",
            "recall@0.5",
        ]
        blocks.append(("h3", "Per image (anchors: positive / negative / ignored)"))
        blocks.append(("table", [keys] + [[r[k] for k in keys] for r in matching["per_image"]]))
        rec = matching["rpn_recall"]
        blocks.append(("h3", f"RPN recall of the top-{matching['top_n']} proposals"))
        blocks.append(
            (
                "table",
                [
                    ["polygon IoU 0.5", "polygon IoU 0.7", "hull IoU 0.5", "hull IoU 0.7"],
                    [rec["poly@0.5"], rec["poly@0.7"], rec["hull@0.5"], rec["hull@0.7"]],
                ],
            )
        )
        for key in ("matching", "objectness"):
            if plots.get(key):
                blocks.append(("img", plots[key]))
    if encoding is not None:
        blocks.append(("h2", "Encoding"))
        blocks.append(
            (
                "p",
                "Mean and standard deviation of each encoded term; targets should "
                "sit near 0 with a unit-ish scale, and predictions should follow them. Rows "
                "equal to their reference (ground truths added as their own RoIs) are left out.",
            )
        )
        rows = [["group", "n", *TERMS]]
        for key, label in ENCODING_GROUPS.items():
            s = encoding[key]
            rows.append([label + " mean", s["count"], *s["mean"]])
            rows.append([label + " std", s["count"], *s["std"]])
        blocks.append(("table", rows))
        if plots.get("encoding"):
            blocks.append(("img", plots["encoding"]))
    if examples:
        blocks.append(("h2", "Examples"))
        blocks.append(
            (
                "p",
                "Green: ground truth; orange dashed: best anchor of each; blue: top "
                f"{DRAWN_PROPOSALS} proposals; red: detections with their scores.",
            )
        )
        blocks += [("img", p) for p in examples]
    for key, label in (("worst_fp", "Worst false positives"), ("missed", "Missed objects")):
        if plots.get(key):
            blocks += [("h2", label), ("img", plots[key])]
    return blocks


def _dataset_findings(cfg: Config) -> list[Finding]:
    from polydet.data.manifest import SPLITS, read_tables

    try:
        images, objects = read_tables(cfg.data.out)
    except (OSError, ValueError):
        return []  # no prepared dataset: the stages below say so
    count = {s: int((objects["split"] == s).sum()) for s in SPLITS}
    return dataset_findings(count, {s: int((images["split"] == s).sum()) for s in SPLITS})


def debug_report(cfg: Config, model: str | None = None) -> dict[str, Any]:
    """Write the debugging report of a model on ``cfg.debug.split`` (module docstring).

    ``model``: as :func:`polydet.eval.evaluate.evaluate_model` (default ``cfg.train.out/model.pt``).
    Returns a summary: the findings, the main numbers and the files written.
    """
    th = Thresholds()
    dcfg = cfg.debug
    out = Path(dcfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_out = Path(cfg.train.out)
    history = read_history(train_out / "history.csv")
    nonfinite = None
    nf_path = train_out / "nonfinite.json"
    if nf_path.is_file():
        try:
            nonfinite = json.loads(nf_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{nf_path}: not JSON ({e})") from e
    loss_stats, findings = analyze_losses(history, nonfinite, th)
    findings = _dataset_findings(cfg) + findings
    plots: dict[str, Path | None] = {}
    if history is not None and len(history):
        plots["losses"] = plot_losses(history, out / "losses.png")

    path = ev.resolve_model(cfg, model)
    net = ev.load_checked_model(cfg, path)
    records = ev.load_split(cfg, dcfg.split)[: dcfg.num_images]
    from polydet.data.dataset import load_image

    images = [load_image(r.path, (r.width, r.height)) for r in records]
    targets = [
        {"polyboxes": r.polyboxes, "labels": r.labels, "difficult": r.difficult} for r in records
    ]
    device = next(net.parameters()).device
    result = _inspect_batched(net, images, targets, device, cfg.evaluate.batch_size)
    rpn = net.cfg.rpn
    classes = list(cfg.data.classes)
    ids = [r.image_id for r in records]
    matching, mf = analyze_matching(
        result,
        targets,
        rpn.fg_iou_thresh,
        rpn.bg_iou_thresh,
        dcfg.top_n_proposals,
        ids,
        classes,
        th,
    )
    encoding, ef = analyze_encoding(result, th)
    findings += mf + ef
    plots["matching"] = plot_matching(matching, out / "matching.png")
    plots["objectness"] = plot_objectness(matching, out / "objectness.png")
    plots["encoding"] = plot_encoding(encoding, out / "encoding.png")

    # Detections on these images, judged by the evaluator: worst false positives, misses.
    gt = ev.ground_truth_of(records)
    dets = ev.detections_of(result["detections"])
    evaluation = evaluate_detections(
        ids,
        classes,
        gt,
        dets,
        cfg.evaluate.iou_threshold,
        score_thresh=cfg.evaluate.score_thresh,
        coco=False,
    )
    examples = draw_examples(result, images, targets, records, classes, cfg, out)
    plots["worst_fp"], plots["missed"] = draw_worst(evaluation, images, gt, dets, classes, out)

    title = (
        f"polydet debug report: {path} on {dcfg.split}: statistics over {len(records)} "
        f"images (debug.num_images), the first {min(len(records), DRAWN_IMAGES)} drawn"
    )
    blocks = _report_blocks(title, findings, loss_stats, matching, encoding, plots, examples)
    (out / "report.md").write_text(render_markdown(blocks, out))
    (out / "report.html").write_text(render_html(blocks, title))
    summary = {
        "model": str(path),
        "split": dcfg.split,
        "images": len(records),
        "findings": [asdict(f) for f in findings],
        "num_errors": sum(f.severity == "error" for f in findings),
        "num_warnings": sum(f.severity == "warning" for f in findings),
        "losses": loss_stats,
        "inspect_losses": result["losses"],
        "matching": matching,
        "encoding": encoding,
        "evaluation": {
            k: v
            for k, v in evaluation.metrics.items()
            if not k.startswith(("recall_at", "score_at", "npos/"))
        },
    }
    (out / "debug.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    return {
        "out": str(out),
        "report": str(out / "report.html"),
        "model": str(path),
        "split": dcfg.split,
        "images": len(records),
        "num_errors": summary["num_errors"],
        "num_warnings": summary["num_warnings"],
        "findings": [f"{f.severity}: [{f.code}] {f.message}" for f in findings],
        "rpn_recall@0.5": matching["rpn_recall"]["poly@0.5"],
        "positives_per_gt_median": matching["positives_per_gt"]["median"],
    }


def _inspect_batched(
    net: Any, images: list[Tensor], targets: list[dict], device: torch.device, batch_size: int
) -> dict[str, Any]:
    """``net.inspect`` over batches, per-image lists concatenated, losses image-weighted."""
    merged: dict[str, Any] = {}
    loss_sum: dict[str, float] = {}
    for s in range(0, len(images), batch_size):
        imgs = [im.to(device) for im in images[s : s + batch_size]]
        tgts = [
            {"polyboxes": t["polyboxes"].to(device), "labels": t["labels"].to(device)}
            for t in targets[s : s + batch_size]
        ]
        r = net.inspect(imgs, tgts)
        for k, v in r.items():
            if k == "losses":
                for name, x in v.items():
                    loss_sum[name] = loss_sum.get(name, 0.0) + x * len(imgs)
            else:
                merged.setdefault(k, []).extend(v)
    merged["losses"] = {k: v / len(images) for k, v in loss_sum.items()}
    return merged
