"""The prepared dataset's tables (``images.csv``, ``objects.csv``), its split and statistics.

Column meanings are the contract in ``docs/CONTRACTS.md``. Derived object columns, from the
canonical polybox: ``area`` (shoelace, px^2), ``hull_w``/``hull_h`` (enclosing axis-aligned
box, px), ``aspect = hull_h / hull_w`` (torchvision's anchor ratio convention), ``angle``
(direction of the first edge, corner 1 -> 2, in degrees, folded into [-90, 90); y down, so a
positive angle turns clockwise on screen). ``first_corner`` (0-3) is the canonical corner the
annotation started at, the object's heading (:mod:`polydet.geometry.heading`); -1 = unknown
(a symmetric class, or a manifest written before the column existed, which still loads).
Statistics use ``size = sqrt(hull_w * hull_h)``,
the quantity an anchor's size is compared with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from polydet.geometry import polybox
from polydet.core.config import SplitConfig

IMAGE_COLUMNS = ["image_id", "path", "width", "height", "split", "num_objects"]
BOX_COLUMNS = ["xc", "yc", "dx1", "dy1", "dx2", "dy2", "dx3", "dy3", "dx4", "dy4"]
OBJECT_COLUMNS = [
    "image_id", "split", "label", "class", "difficult", "truncated", *BOX_COLUMNS,
    "area", "hull_w", "hull_h", "aspect", "angle", "first_corner",
]  # fmt: skip
SPLITS = ("train", "val", "test")


def split_ids(ids: Sequence[str], cfg: SplitConfig) -> dict[str, str]:
    """Deterministic split ``{id: "train" | "val" | "test"}``: the sorted ids are shuffled by a
    numpy generator seeded with ``cfg.seed`` and cut by the fractions (rounded; a split with a
    positive fraction gets at least one id when there are at least 3). Same ids + seed -> same
    split, whatever order the ids came in."""
    ids = sorted(set(ids))
    n = len(ids)
    order = np.random.default_rng(cfg.seed).permutation(n)

    def count(frac: float) -> int:
        k = int(round(frac * n))
        return max(k, 1) if frac > 0 and n >= 3 else k

    n_val, n_test = count(cfg.val), count(cfg.test)
    n_test = min(n_test, n - n_val)
    out = {}
    for rank, i in enumerate(order):
        out[ids[i]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return out


def object_rows(
    image_id: str,
    split: str,
    polyboxes: np.ndarray,
    labels: np.ndarray,
    difficult: np.ndarray,
    truncated: np.ndarray,
    classes: Sequence[str],
    first_corner: np.ndarray | None = None,
) -> pd.DataFrame:
    """Manifest rows for one image's objects (polyboxes ``[N, 10]`` canonical, pixels;
    ``first_corner [N]``, default unknown)."""
    boxes = torch.as_tensor(np.asarray(polyboxes, dtype=np.float64)).reshape(-1, 10)
    hull = polybox.hull_xyxy(boxes).numpy()  # [N, 4]
    c = polybox.to_corners(boxes).numpy()  # [N, 4, 2]
    edge = c[:, 1] - c[:, 0]
    angle = np.degrees(np.arctan2(edge[:, 1], edge[:, 0]))
    angle = (angle + 90.0) % 180.0 - 90.0
    hull_w, hull_h = hull[:, 2] - hull[:, 0], hull[:, 3] - hull[:, 1]
    df = pd.DataFrame(boxes.numpy(), columns=BOX_COLUMNS)
    df.insert(0, "image_id", image_id)
    df.insert(1, "split", split)
    df.insert(2, "label", np.asarray(labels, dtype=np.int64))
    df.insert(3, "class", [classes[int(k) - 1] for k in labels])
    df.insert(4, "difficult", np.asarray(difficult, dtype=np.int64))
    df.insert(5, "truncated", np.asarray(truncated, dtype=np.int64))
    df["area"] = polybox.area(boxes).numpy()
    df["hull_w"] = hull_w
    df["hull_h"] = hull_h
    df["aspect"] = hull_h / np.maximum(hull_w, 1e-9)
    df["angle"] = angle
    n = len(df)
    first = np.full(n, -1) if first_corner is None else np.asarray(first_corner).reshape(n)
    df["first_corner"] = first.astype(np.int64)
    return df


def write_tables(out_dir: Path, images: pd.DataFrame, objects: pd.DataFrame) -> None:
    """Write ``images.csv`` and ``objects.csv`` (columns in contract order; floats as %.4f
    so that the files are stable and diffable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images[IMAGE_COLUMNS].to_csv(out_dir / "images.csv", index=False)
    objects[OBJECT_COLUMNS].to_csv(out_dir / "objects.csv", index=False, float_format="%.4f")


def read_tables(prepared_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(images, objects)`` DataFrames of a prepared dataset (``image_id`` kept as text)."""
    d = Path(prepared_dir)
    dtypes = {"image_id": str, "path": str, "split": str, "class": str}
    images = pd.read_csv(d / "images.csv", dtype=dtypes, keep_default_na=False)
    objects = pd.read_csv(d / "objects.csv", dtype=dtypes, keep_default_na=False)
    if "first_corner" not in objects.columns:  # written before the heading existed: unknown
        objects["first_corner"] = -1
    return images, objects


def _quantiles(x: pd.Series) -> dict[str, float]:
    if len(x) == 0:
        return {}
    q = x.quantile([0.05, 0.25, 0.5, 0.75, 0.95]).to_numpy()
    keys = ["p5", "p25", "p50", "p75", "p95"]
    out = {"min": float(x.min()), **{k: float(v) for k, v in zip(keys, q)}, "max": float(x.max())}
    return {k: round(v, 3) for k, v in out.items()}


def compute_stats(images: pd.DataFrame, objects: pd.DataFrame, classes: Sequence[str]) -> dict:
    """Dataset statistics (JSON-able): counts by split, objects per image, and per class the
    distribution of ``size = sqrt(hull_w * hull_h)`` (px) and ``aspect = hull_h / hull_w``,
    with histograms on fixed log-spaced edges (the anchor stage reads these)."""
    size = np.sqrt(objects["hull_w"] * objects["hull_h"])
    size_edges = np.geomspace(4, 4096, 31)  # 2^(1/3) steps
    aspect_edges = np.geomspace(1 / 8, 8, 25)  # 2^(1/4) steps
    per_image = images["num_objects"]
    stats: dict = {
        "num_images": {s: int((images["split"] == s).sum()) for s in SPLITS},
        "num_objects": {s: int((objects["split"] == s).sum()) for s in SPLITS},
        "empty_images": int((per_image == 0).sum()),
        "objects_per_image": {
            "mean": round(float(per_image.mean()), 3) if len(per_image) else 0.0,
            "max": int(per_image.max()) if len(per_image) else 0,
            "histogram": {str(k): int(v) for k, v in per_image.value_counts().sort_index().items()},
        },
        "size_edges": [round(float(e), 3) for e in size_edges],
        "aspect_edges": [round(float(e), 4) for e in aspect_edges],
        "classes": {},
    }
    for label, name in enumerate(classes, 1):
        sel = objects["label"] == label
        stats["classes"][name] = {
            "count": int(sel.sum()),
            "difficult": int(objects.loc[sel, "difficult"].sum()),
            "truncated": int(objects.loc[sel, "truncated"].sum()),
            "size": _quantiles(size[sel]),
            "aspect": _quantiles(objects.loc[sel, "aspect"]),
            "area": _quantiles(objects.loc[sel, "area"]),
            "size_histogram": np.histogram(size[sel], size_edges)[0].tolist(),
            "aspect_histogram": np.histogram(objects.loc[sel, "aspect"], aspect_edges)[0].tolist(),
        }
    return stats


def _plots(
    out_dir: Path, images: pd.DataFrame, objects: pd.DataFrame, classes: Sequence[str]
) -> list[str]:
    """Histograms as PNG files (matplotlib's object API: no global pyplot state)."""
    from matplotlib.figure import Figure

    size = np.sqrt(objects["hull_w"] * objects["hull_h"])
    names = []

    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    counts = images["num_objects"].value_counts().sort_index()
    ax.bar(counts.index.astype(int), counts.to_numpy(), color="tab:gray")
    ax.set(xlabel="objects per image", ylabel="images", title="Objects per image")
    fig.tight_layout()
    fig.savefig(out_dir / "objects_per_image.png", dpi=80)
    names.append("objects_per_image.png")

    for key, values, edges, label in (
        ("size", size, np.geomspace(4, 1024, 25), "size sqrt(hull_w * hull_h) [px]"),
        ("aspect", objects["aspect"], np.geomspace(1 / 8, 8, 25), "aspect hull_h / hull_w"),
    ):
        fig = Figure(figsize=(5, 3.2))
        ax = fig.subplots()
        for k, name in enumerate(classes, 1):
            v = values[objects["label"] == k]
            if len(v):
                ax.hist(v, bins=edges, histtype="step", linewidth=1.5, label=f"{name} ({len(v)})")
        ax.set_xscale("log")
        ax.set(xlabel=label, ylabel="objects", title=f"Object {key} by class")
        if len(objects):
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{key}_by_class.png", dpi=80)
        names.append(f"{key}_by_class.png")
    return names


def write_report(
    out_dir: Path, images: pd.DataFrame, objects: pd.DataFrame, classes: Sequence[str]
) -> dict:
    """Write ``stats.json``, ``stats.md`` and the histogram PNGs; returns the statistics."""
    stats = compute_stats(images, objects, classes)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    plots = _plots(out_dir, images, objects, classes)
    lines = [
        "# Dataset statistics",
        "",
        "| split | images | objects |",
        "| --- | ---: | ---: |",
        *(f"| {s} | {stats['num_images'][s]} | {stats['num_objects'][s]} |" for s in SPLITS),
        "",
        f"Empty images: {stats['empty_images']}; objects per image: mean "
        f"{stats['objects_per_image']['mean']}, max {stats['objects_per_image']['max']}.",
        "",
        "| class | objects | difficult | truncated | size p5 / p50 / p95 [px] | aspect p5 / p50 / p95 |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for name, c in stats["classes"].items():
        sz, ar = c["size"], c["aspect"]
        q = (
            (
                f"{sz['p5']:.0f} / {sz['p50']:.0f} / {sz['p95']:.0f}",
                f"{ar['p5']:.2f} / {ar['p50']:.2f} / {ar['p95']:.2f}",
            )
            if sz
            else ("-", "-")
        )
        lines.append(
            f"| {name} | {c['count']} | {c['difficult']} | {c['truncated']} | {q[0]} | {q[1]} |"
        )
    lines += [
        "",
        "size = sqrt(hull_w * hull_h) of the enclosing axis-aligned box; aspect = hull_h / hull_w.",
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    (out_dir / "stats.md").write_text("\n".join(lines) + "\n")
    return stats
