"""The anchors stage: fit anchor sizes and aspect ratios to the training objects, and report
how well anchors cover them.

Everything happens at the **model's input scale**: each image is resized as torchvision's
``GeneralizedRCNNTransform`` does (scale ``s = min(min_size / shorter side, max_size / longer
side)``, output ``floor(side * s)`` pixels, boxes scaled by ``new / old`` per axis, then
padded to a multiple of 32), and a ground truth is its enclosing axis-aligned box (hull),
which is what the RPN matches anchors against.

Coverage. A ground truth's best anchor IoU is its largest IoU with any anchor of the real
anchor grid: torchvision's ``AnchorGenerator`` geometry (rounded base anchors of every
size x ratio, centred on ``(i, j) * stride`` of each FPN level; strides measured on the
configured backbone, as ``image size // feature size``). Because box IoU with a fixed
anchor shape only grows with the overlap along x and along y separately, the best grid
cell is, per axis, one of the two cells around the ground truth's centre: so only those
are evaluated (exact, tested against the full grid). Coverage at ``t`` = share of ground
truths whose best IoU is ``>= t``, for ``t`` = 0.5 and 0.7, overall, per class and per size
bucket (``small < 32^2 <= medium < 96^2 <= large``, hull area in input pixels). Ground
truths below 0.5 under the chosen anchors are listed as ``unreachable``.

Fit (``anchors.fit``). Ratios ``h / w``: ``anchors.num_ratios`` clusters of 1-D k-means on
``log(h / w)``; sizes: as many clusters as ``anchors.sizes`` has sizes in all, 1-D k-means
on ``log(sqrt(w h))``, sorted and dealt to the levels in order (rounded to distinct
integers). Log space because, for concentric boxes, ``1 - IoU`` is a monotone function of
the log-size gap at equal shape and of the log-ratio gap at equal area: the YOLO ``1 - IoU``
k-means, factored into the sizes x ratios grid ``AnchorGenerator`` needs. Initial centres
are quantiles, so the fit is deterministic. The fitted set replaces the configured one
only if it covers at least as many ground truths at IoU 0.5 (ties: higher mean best IoU);
the report says which was chosen. Without ``fit`` the configured anchors are written.

Size factor (``anchors.size_factor``). A chosen fit's sizes are then multiplied by it (the
set named ``fitted x size_factor`` in the report, with its own coverage). ``auto`` picks the
factor in 1-2 that gives the most ground truths an anchor at the RPN's positive threshold
(``model.rpn.fg_iou_thresh``) on the real grid (:func:`auto_size_factor`): the k-means fit
treats anchors as centred on the objects, the grid does not. On the synthetic default the
factor is 1.35 and the anchors 1.2-1.4x the fit gave much better test AP75 (README).

Outputs under ``anchors.out``: ``anchors.json`` (``{"sizes", "aspect_ratios"}``, the
contract the model reads), ``coverage.json``, ``report.md``, ``coverage.png``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator

from polydet.core.config import Config, ConfigError, ModelConfig
from polydet.core.errors import DataError
from polydet.data.manifest import BOX_COLUMNS
from polydet.geometry import polybox

THRESHOLDS = (0.5, 0.7)
SCALED = "fitted x size_factor"  # the report's name of the scaled fit
SIZE_BUCKETS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, math.inf))
SIZE_DIVISIBLE = 32  # GeneralizedRCNNTransform pads images to a multiple of this


@dataclass(frozen=True)
class GroundTruths:
    """Training objects at the model's input scale (``G`` of them)."""

    image_id: np.ndarray  # [G] str
    index: np.ndarray  # [G] int: position among its image's objects in objects.csv
    line: np.ndarray  # [G] int: line of objects.csv (the header is line 1)
    cls: np.ndarray  # [G] str: class name
    boxes: np.ndarray  # [G, 4] float64: hull (x1, y1, x2, y2), input pixels
    padded: np.ndarray  # [G, 2] int: padded input image (width, height), pixels


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """A prepared table as text, with the given columns required."""
    if not path.is_file():
        raise DataError(f"{path}: missing; run `polydet prepare` first")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a readable CSV table ({e})") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def _numbers(df: pd.DataFrame, columns: list[str], path: Path) -> np.ndarray:
    """Columns as float64 ``[rows, len(columns)]``; a non-number names its file and line."""
    out = np.empty((len(df), len(columns)))
    for k, col in enumerate(columns):
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{path} line {i + 2}: column {col!r} is not a finite number: {df[col].iloc[i]!r}"
            )
        out[:, k] = values
    return out


def input_scale(width: np.ndarray, height: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """``[N, 4]``: per image the scale factors ``(sx, sy)`` and the resized size ``(w, h)``
    in pixels, by torchvision's resize rule (module docstring)."""
    scale = np.minimum(min_size / np.minimum(width, height), max_size / np.maximum(width, height))
    new_w, new_h = np.floor(width * scale), np.floor(height * scale)
    return np.stack([new_w / width, new_h / height, new_w, new_h], axis=-1)


def load_train_objects(prepared_dir: str | Path, min_size: int, max_size: int) -> GroundTruths:
    """The train split's objects from ``images.csv`` / ``objects.csv`` at input scale."""
    d = Path(prepared_dir)
    images_path, objects_path = d / "images.csv", d / "objects.csv"
    images = _read_csv(images_path, ["image_id", "width", "height"])
    objects = _read_csv(objects_path, ["image_id", "split", "class", *BOX_COLUMNS])
    size = _numbers(images, ["width", "height"], images_path)
    if (size <= 0).any():
        i = int(np.argmax((size <= 0).any(1)))
        raise DataError(f"{images_path} line {i + 2}: image width and height must be positive")
    by_id = dict(zip(images["image_id"], range(len(images))))
    lines = np.arange(len(objects)) + 2
    index = objects.groupby("image_id", sort=False).cumcount().to_numpy()
    train = (objects["split"] == "train").to_numpy()
    objects, lines, index = objects[train], lines[train], index[train]
    rows = np.array([by_id.get(i, -1) for i in objects["image_id"]], dtype=np.int64)
    if (rows < 0).any():
        k = int(np.argmax(rows < 0))
        raise DataError(
            f"{objects_path} line {lines[k]}: image_id {objects['image_id'].iloc[k]!r} "
            f"is not in {images_path}"
        )
    boxes = _numbers(objects, BOX_COLUMNS, objects_path)
    hull = polybox.hull_xyxy(torch.from_numpy(boxes)).numpy()  # [G, 4], image pixels
    resize = input_scale(size[rows, 0], size[rows, 1], min_size, max_size)  # [G, 4]
    hull = hull * np.concatenate([resize[:, :2], resize[:, :2]], axis=1)
    padded = (np.ceil(resize[:, 2:] / SIZE_DIVISIBLE) * SIZE_DIVISIBLE).astype(np.int64)
    return GroundTruths(
        image_id=objects["image_id"].to_numpy(str),
        index=index,
        line=lines,
        cls=objects["class"].to_numpy(str),
        boxes=hull,
        padded=padded,
    )


@functools.lru_cache(maxsize=8)
@torch.no_grad()
def level_strides(model_cfg: ModelConfig) -> tuple[int, ...]:
    """Nominal stride (input pixels per feature cell) of each FPN level of the configured
    backbone that the RPN sees (so has anchors: not ``model.fine_roi_level``'s stride-4
    level, which only RoI pooling reads), measured on a 256 x 256 input (no weights are
    read; cached per config)."""
    from polydet.model.backbone import build_backbone

    backbone = build_backbone(model_cfg, load_weights=False).eval()
    features = list(backbone(torch.zeros(1, 3, 256, 256)).values())
    if model_cfg.fine_roi_level:
        features = features[1:]
    return tuple(256 // f.shape[-1] for f in features)


def base_anchors(sizes: list[list[int]], ratios: list[float]) -> list[torch.Tensor]:
    """torchvision's rounded base anchors ``[A, 4]`` per level (centred on the origin)."""
    gen = AnchorGenerator(tuple(tuple(s) for s in sizes), (tuple(ratios),) * len(sizes))
    return [a.double() for a in gen.cell_anchors]


def best_anchor_iou(
    gt: GroundTruths, sizes: list[list[int]], ratios: list[float], strides: Sequence[int]
) -> np.ndarray:
    """Best IoU ``[G]`` of each ground truth's hull with the anchor grid (module docstring)."""
    if len(gt.boxes) == 0:
        return np.zeros(0)
    boxes = torch.from_numpy(gt.boxes)  # [G, 4]
    padded = torch.from_numpy(gt.padded).double()  # [G, 2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [G, 2]
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)  # [G]
    best = torch.zeros(len(boxes), dtype=torch.float64)
    for base, nominal in zip(base_anchors(sizes, ratios), strides):
        cells = torch.ceil(padded / nominal)  # [G, 2] feature map (w, h)
        stride = torch.div(padded, cells, rounding_mode="floor")  # torchvision's integer stride
        inter = torch.ones(len(boxes), len(base), dtype=torch.float64)  # [G, A]
        for axis in (0, 1):
            lo, hi = base[:, axis], base[:, axis + 2]  # [A]: anchor extent around its cell
            pos = (centre[:, axis, None] - (lo + hi) / 2) / stride[:, axis, None]  # [G, A]
            overlap = torch.zeros_like(pos)
            for cell in (pos.floor(), pos.ceil()):
                shift = (
                    torch.minimum(cell.clamp_min(0), cells[:, axis, None] - 1)
                    * stride[:, axis, None]
                )
                o = torch.minimum(boxes[:, axis + 2, None], shift + hi) - torch.maximum(
                    boxes[:, axis, None], shift + lo
                )
                overlap = torch.maximum(overlap, o.clamp_min(0))
            inter = inter * overlap
        anchor_area = (base[:, 2] - base[:, 0]) * (base[:, 3] - base[:, 1])  # [A]
        iou = inter / (area[:, None] + anchor_area - inter)
        best = torch.maximum(best, iou.amax(1))
    return best.numpy()


def _kmeans_1d(x: np.ndarray, k: int, iterations: int = 100) -> np.ndarray:
    """Sorted centres ``[k]`` of 1-D k-means on ``x``, initialised at quantiles."""
    centres = np.quantile(x, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        assign = np.abs(x[:, None] - centres[None]).argmin(1)
        new = np.array(
            [x[assign == j].mean() if (assign == j).any() else centres[j] for j in range(k)]
        )
        if np.allclose(new, centres, rtol=0, atol=1e-12):
            break
        centres = new
    return np.sort(centres)


def fit_anchors(
    boxes: np.ndarray, per_level: list[int], num_ratios: int
) -> tuple[list[list[int]], list[float]]:
    """Sizes (``per_level[l]`` distinct integers for level ``l``, increasing) and
    ``num_ratios`` aspect ratios (h / w) fitted to hull boxes ``[G, 4]`` (module docstring)."""
    wh = boxes[:, 2:] - boxes[:, :2]
    wh = wh[(wh > 0).all(1)]
    if len(wh) == 0:
        raise DataError("anchors: no training object with a positive width and height to fit")
    ratios = np.exp(_kmeans_1d(np.log(wh[:, 1] / wh[:, 0]), num_ratios))
    flat = np.exp(_kmeans_1d(0.5 * np.log(wh[:, 0] * wh[:, 1]), sum(per_level)))
    sizes: list[int] = []
    for s in flat:  # distinct increasing integers: duplicate anchors would waste RPN outputs
        sizes.append(max(int(round(s)), sizes[-1] + 1 if sizes else 1))
    levels, start = [], 0
    for n in per_level:
        levels.append(sizes[start : start + n])
        start += n
    return levels, [round(float(r), 3) for r in ratios]


def scale_sizes(sizes: list[list[int]], factor: float) -> list[list[int]]:
    """``sizes`` times ``factor``, rounded, kept distinct and increasing (as the fit's)."""
    out: list[list[int]] = []
    last = 0
    for level in sizes:
        out.append([])
        for s in level:
            last = max(int(round(s * factor)), last + 1)
            out[-1].append(last)
    return out


AUTO_FACTORS = tuple(round(1.0 + 0.05 * i, 2) for i in range(21))  # 1.0, 1.05, ..., 2.0


def auto_size_factor(
    gt: GroundTruths, fitted: dict, strides: Sequence[int], threshold: float
) -> float:
    """The factor of :data:`AUTO_FACTORS` whose scaled fit gives the most ground truths a best
    anchor IoU ``>= threshold`` (the RPN's positive threshold) on the real anchor grid; ties:
    the higher mean best IoU, then the smaller factor. The k-means fit matches sizes as if
    anchors were centred on the objects; on the grid they are up to half a stride off, and a
    larger anchor still contains an off-centre object, so the best factor is above 1."""
    best_key, best_factor = None, 1.0
    for factor in AUTO_FACTORS:
        sizes = scale_sizes(fitted["sizes"], factor)
        iou = best_anchor_iou(gt, sizes, fitted["aspect_ratios"], strides)
        key = (int((iou >= threshold).sum()), float(iou.mean()))
        if best_key is None or key > best_key:
            best_key, best_factor = key, factor
    return best_factor


def _stats(best: np.ndarray) -> dict:
    out = {"count": int(len(best)), "mean_best_iou": float(best.mean()) if len(best) else None}
    for t in THRESHOLDS:
        out[f"coverage@{t}"] = float((best >= t).mean()) if len(best) else None
    return out


def coverage(gt: GroundTruths, best: np.ndarray) -> dict:
    """Coverage statistics overall, per class and per size bucket."""
    area = (gt.boxes[:, 2:] - gt.boxes[:, :2]).prod(-1)
    return {
        "overall": _stats(best),
        "per_class": {c: _stats(best[gt.cls == c]) for c in sorted(set(gt.cls.tolist()))},
        "per_size": {
            name: _stats(best[(area >= lo) & (area < hi)]) for name, lo, hi in SIZE_BUCKETS
        },
    }


def _better(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether best-IoU vector ``a`` covers at least as well as ``b`` (IoU 0.5, then mean)."""
    ca, cb = (a >= 0.5).sum(), (b >= 0.5).sum()
    return bool(ca > cb or (ca == cb and a.mean() >= b.mean()))


def _plot(path: Path, gt: GroundTruths, results: dict, chosen: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wh = gt.boxes[:, 2:] - gt.boxes[:, :2]
    best = results[chosen]["best"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax1.scatter(wh[best >= 0.5, 0], wh[best >= 0.5, 1], s=6, alpha=0.4, label="ground truth")
    ax1.scatter(wh[best < 0.5, 0], wh[best < 0.5, 1], s=10, c="red", label="unreachable")
    for name, style in (
        ("configured", {"marker": "x", "c": "k"}),
        ("fitted", {"marker": "o", "facecolors": "none", "edgecolors": "tab:orange"}),
        (SCALED, {"marker": "s", "facecolors": "none", "edgecolors": "tab:green"}),
    ):
        if name not in results:
            continue
        a = results[name]["anchors"]
        # Anchor of size s and ratio r: w = s / sqrt(r), h = s * sqrt(r) (torchvision).
        shapes = [(s / math.sqrt(r), s * math.sqrt(r)) for lvl in a["sizes"] for s in lvl
                  for r in a["aspect_ratios"]]  # fmt: skip
        w, h = zip(*shapes)
        ax1.scatter(w, h, s=60, label=f"{name} anchors", **style)
    ax1.set(xscale="log", yscale="log", xlabel="hull width (input px)",
            ylabel="hull height (input px)", title="objects and anchor shapes")  # fmt: skip
    ax1.legend(fontsize=8)
    bins = np.linspace(0, 1, 41)
    for name, res in results.items():
        ax2.hist(res["best"], bins=bins, histtype="step", label=name)
    for t in THRESHOLDS:
        ax2.axvline(t, ls="--", c="grey")
    ax2.set(xlabel="best anchor IoU", ylabel="ground truths", title=f"chosen: {chosen}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report(summary: dict, cov: dict, unreachable: list[dict]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    names = [n for n in ("configured", "fitted", SCALED) if n in cov["sets"]]
    lines = [
        "# Anchor configuration",
        "",
        f"Training objects: {cov['num_objects']} (hull boxes at the model's input scale); "
        f"FPN strides {cov['strides']}.",
        f"Chosen: **{summary['source']}** — sizes {summary['anchors']['sizes']}, "
        f"aspect ratios (h/w) {summary['anchors']['aspect_ratios']}.",
        "",
        "| anchors | sizes | ratios | mean best IoU | coverage@0.5 | coverage@0.7 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n in names:
        s = cov["sets"][n]
        o = s["overall"]
        lines.append(
            f"| {n} | {s['anchors']['sizes']} | {s['anchors']['aspect_ratios']} | "
            f"{o['mean_best_iou']:.3f} | {pct(o['coverage@0.5'])} | {pct(o['coverage@0.7'])} |"
        )
    for group in ("per_class", "per_size"):
        lines += ["", f"## Coverage@0.5 / @0.7 {group.replace('_', ' ')}", ""]
        lines.append("| " + " | ".join(["group", "count", *names]) + " |")
        lines.append("| " + " | ".join(["---"] * (2 + len(names))) + " |")
        for key, st in cov["sets"][names[0]][group].items():
            cells = [
                f"{pct(cov['sets'][n][group][key]['coverage@0.5'])} / "
                f"{pct(cov['sets'][n][group][key]['coverage@0.7'])}"
                for n in names
            ]
            lines.append(f"| {key} | {st['count']} | " + " | ".join(cells) + " |")
    lines += ["", f"## Unreachable ground truths (best IoU < 0.5): {len(unreachable)}", ""]
    if unreachable:
        lines += ["| image_id | index | objects.csv line | class | w | h | best IoU |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for u in unreachable[:25]:
            lines.append(
                f"| {u['image_id']} | {u['index']} | {u['line']} | {u['class']} | "
                f"{u['w']:.1f} | {u['h']:.1f} | {u['best_iou']:.3f} |"
            )
        if len(unreachable) > 25:
            lines.append(f"\n… and {len(unreachable) - 25} more in coverage.json.")
    lines += ["", "![coverage](coverage.png)", ""]
    return "\n".join(lines)


def configured_anchors(cfg: Config) -> dict[str, list]:
    """The configured anchors (``anchors.sizes`` / ``aspect_ratios``) as in ``anchors.json``."""
    ac = cfg.anchors
    return {"sizes": [list(s) for s in ac.sizes], "aspect_ratios": list(ac.aspect_ratios)}


def load_anchors(cfg: Config) -> dict[str, list]:
    """The model's anchors: ``{anchors.out}/anchors.json`` (the anchors stage's choice) if it
    exists, else :func:`configured_anchors`. A malformed file is a :class:`DataError`."""
    path = Path(cfg.anchors.out) / "anchors.json"
    if not path.is_file():
        return configured_anchors(cfg)
    try:
        raw = json.loads(path.read_text())
        return {
            "sizes": [[int(s) for s in level] for level in raw["sizes"]],
            "aspect_ratios": [float(r) for r in raw["aspect_ratios"]],
        }
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not an anchors file ({e})") from e


def configure_anchors(cfg: Config) -> dict:
    """Run the anchors stage (module docstring); returns a JSON-able summary."""
    ac = cfg.anchors
    configured = configured_anchors(cfg)
    strides = level_strides(cfg.model)
    if len(ac.sizes) != len(strides):
        raise ConfigError(
            f"anchors.sizes has {len(ac.sizes)} levels but the backbone ({cfg.model.backbone}, "
            f"model.returned_layers {list(cfg.model.returned_layers)}) has {len(strides)}"
        )
    if ac.num_ratios < 1 or any(len(s) < 1 for s in ac.sizes):
        raise ConfigError("anchors: num_ratios and every level of anchors.sizes need >= 1 value")
    gt = load_train_objects(cfg.data.out, cfg.model.min_size, cfg.model.max_size)
    if len(gt.boxes) == 0:
        raise DataError(f"{Path(cfg.data.out) / 'objects.csv'}: no objects in the train split")
    sets = {"configured": configured}
    if ac.fit:
        sizes, ratios = fit_anchors(gt.boxes, [len(s) for s in ac.sizes], ac.num_ratios)
        sets["fitted"] = {"sizes": sizes, "aspect_ratios": ratios}
    results = {
        name: {"anchors": a, "best": best_anchor_iou(gt, a["sizes"], a["aspect_ratios"], strides)}
        for name, a in sets.items()
    }
    chosen = "configured"
    if "fitted" in results and _better(results["fitted"]["best"], results["configured"]["best"]):
        chosen = "fitted"
    factor = 1.0
    if chosen == "fitted" and ac.size_factor != 1.0:
        fitted = results["fitted"]["anchors"]
        if ac.size_factor == "auto":
            factor = auto_size_factor(gt, fitted, strides, cfg.model.rpn.fg_iou_thresh)
        else:
            factor = float(ac.size_factor)
        scaled = {
            "sizes": scale_sizes(fitted["sizes"], factor),
            "aspect_ratios": fitted["aspect_ratios"],
        }
        best = best_anchor_iou(gt, scaled["sizes"], scaled["aspect_ratios"], strides)
        results[SCALED] = {"anchors": scaled, "best": best}
        chosen = SCALED
    best = results[chosen]["best"]
    wh = gt.boxes[:, 2:] - gt.boxes[:, :2]
    unreachable = [
        {
            "image_id": str(gt.image_id[i]),
            "index": int(gt.index[i]),
            "line": int(gt.line[i]),
            "class": str(gt.cls[i]),
            "w": float(wh[i, 0]),
            "h": float(wh[i, 1]),
            "best_iou": float(best[i]),
        }  # fmt: skip
        for i in np.argsort(best, kind="stable")
        if best[i] < 0.5
    ]
    anchors = results[chosen]["anchors"]
    source = chosen if ac.fit else "configured (anchors.fit is false)"
    if chosen == SCALED:
        how = (
            f"auto: most objects with an anchor at IoU >= {cfg.model.rpn.fg_iou_thresh:g}, "
            "model.rpn.fg_iou_thresh"
            if ac.size_factor == "auto"
            else "anchors.size_factor"
        )
        source = f"fitted, sizes x {factor:g} ({how})"
    if ac.fit and chosen == "configured":
        source = "configured (the fit covered fewer ground truths at IoU 0.5)"
    cov = {
        "num_objects": int(len(gt.boxes)),
        "strides": list(strides),
        "chosen": chosen,
        "size_factor": factor,
        "sets": {
            n: {"anchors": r["anchors"], **coverage(gt, r["best"])} for n, r in results.items()
        },
        "unreachable": unreachable,
    }
    summary = {
        "source": source,
        "anchors": anchors,
        "num_objects": cov["num_objects"],
        "coverage@0.5": cov["sets"][chosen]["overall"]["coverage@0.5"],
        "coverage@0.7": cov["sets"][chosen]["overall"]["coverage@0.7"],
        "configured_coverage@0.5": cov["sets"]["configured"]["overall"]["coverage@0.5"],
        "num_unreachable": len(unreachable),
        "out": str(ac.out),
    }
    out = Path(ac.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "anchors.json").write_text(json.dumps(anchors, indent=2) + "\n")
    (out / "coverage.json").write_text(json.dumps(cov, indent=2) + "\n")
    (out / "report.md").write_text(_report(summary, cov, unreachable))
    _plot(out / "coverage.png", gt, results, chosen)
    return summary
