"""The prepare stage: read the raw dataset, validate, tile, split, write the manifest.

``prepare(cfg)`` reads ``cfg.data.root`` in ``cfg.data.format`` (layouts in
:mod:`polydet.data.layouts`), checks every record (:mod:`polydet.data.validate`, policy
``cfg.data.on_error``), tiles images larger than ``cfg.data.tile.size`` when tiling is
enabled, splits by *source* image (tiles of one image never straddle splits) and writes
under ``cfg.data.out``: ``images.csv``, ``objects.csv``, ``import_summary.json``,
``import_issues.txt``, ``stats.json``, ``stats.md``, histogram PNGs and ``tiles/``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from polydet.core.config import Config, DataConfig
from polydet.data import manifest, tiling
from polydet.data.layouts import SourceImage, read_dataset
from polydet.data.validate import ImportLog, ValidObjects, validate_objects
from polydet.core.errors import DataError
from polydet.core.files import WriteError, describe_os_error, process_alive

# Issues shown in the returned summary (all of them are in import_issues.txt).
SHOWN_ISSUES = 20


@dataclass(frozen=True)
class Imported:
    """The checked raw dataset: usable images, their surviving objects, the log."""

    sources: list[SourceImage]
    objects: list[ValidObjects]  # per source image
    log: ImportLog
    summary: dict


def import_dataset(dc: DataConfig) -> Imported:
    """Read and check ``dc.root`` in ``dc.format`` under policy ``dc.on_error`` (nothing is
    written); a data problem under ``stop`` raises :class:`~polydet.core.errors.DataError`."""
    log = ImportLog(dc.on_error)
    sources = read_dataset(dc.root, dc.format, dc.classes, log)
    valid = [
        validate_objects(
            s.objects, s.locations, dc.classes, log, (s.width, s.height), dc.min_inside
        )
        for s in sources
    ]
    summary = log.summary(len(sources), sum(len(x.labels) for x in valid))
    return Imported(sources, valid, log, {"format": dc.format, "root": dc.root, **summary})


def prepare(cfg: Config) -> dict:
    """Run the prepare stage (module docstring); returns a JSON-able summary.

    Everything is written into a staging directory beside ``data.out`` that replaces it only
    when complete: a failed or killed run leaves the previous prepared dataset whole (its
    import report goes to ``<data.out>.failed/``), and the next run removes the leftovers.
    """
    dc = cfg.data
    out = Path(dc.out)
    _remove_leftovers(out)
    imp = import_dataset(dc)
    if not imp.sources:
        failed = out.with_name(out.name + ".failed")
        imp.log.write(failed, imp.summary)
        raise DataError(
            f"{dc.root}: no usable image (see {failed / 'import_issues.txt'}); {out} is unchanged"
        )
    stage = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        result = _write_prepared(dc, imp, out, stage)
        _swap(stage, out)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise WriteError(describe_os_error(e)) from e
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(out.with_name(out.name + ".failed"), ignore_errors=True)
    return result


def _remove_leftovers(out: Path) -> None:
    """Staging directories of killed runs; a previous dataset a killed swap left aside."""
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, pid = p.name.rpartition("-")
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if kind.endswith(".old") and not out.exists():
            p.rename(out)  # killed between the two renames of _swap: put it back
        elif kind.endswith((".old", ".staging")):
            shutil.rmtree(p, ignore_errors=True)


def _swap(stage: Path, out: Path) -> None:
    """Put the complete ``stage`` in place of ``out`` (two renames; never a mix of both)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    stage.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _write_prepared(dc: DataConfig, imp: Imported, out: Path, stage: Path) -> dict:
    """Write the prepared dataset into ``stage``; its paths name ``out``, where it will be."""
    sources, valid, log, summary = imp.sources, imp.objects, imp.log, imp.summary
    log.write(stage, summary)
    split = manifest.split_ids([s.image_id for s in sources], dc.split)
    index = tiling.load_index(out / "tiles")
    tiles_dir = stage / "tiles"
    _link_tiles(out / "tiles", tiles_dir, index)  # current tiles are reused, not rewritten
    image_rows, object_frames = [], []
    tiled = written = 0
    current_tiles: set[str] = set()
    for src, objs in zip(sources, valid):
        part = split[src.image_id]
        first_all = _first_corner(objs, dc)
        t = dc.tile
        if t.enabled and (src.width > t.size or src.height > t.size):
            plan = tiling.tile_plan(src.width, src.height, t.size, t.overlap, t.scales)
            paths, n = tiling.write_tiles(src.path, src.image_id, plan, tiles_dir, index)
            paths = [out / "tiles" / p.name for p in paths]
            tiled, written = tiled + 1, written + n
            for (box, r), path in zip(plan, paths):
                name = tiling.tile_name(src.image_id, box, r)
                current_tiles.add(name)
                boxes, idx, clipped = tiling.tile_objects(objs.polyboxes, box, t.min_visible, r)
                trunc = objs.truncated[idx] | clipped
                size = tiling.scaled_size(box, r)
                image_rows.append((name, str(path), *size, part, len(idx)))
                first = tiling.tile_first_corner(objs.polyboxes, first_all, box, r, boxes, idx)
                object_frames.append(
                    manifest.object_rows(
                        name,
                        part,
                        boxes,
                        objs.labels[idx],
                        objs.difficult[idx],
                        trunc,
                        dc.classes,
                        first,
                    )
                )
        else:
            image_rows.append(
                (src.image_id, str(src.path), src.width, src.height, part, len(objs.labels))
            )
            object_frames.append(
                manifest.object_rows(
                    src.image_id,
                    part,
                    objs.polyboxes,
                    objs.labels,
                    objs.difficult,
                    objs.truncated,
                    dc.classes,
                    first_all,
                )
            )
    # Forget (and delete) tiles of images that are gone or no longer tiled. The index is
    # written even when empty: later stages list tiles/ as a dependency, and DVC does not
    # restore empty directories.
    for name in sorted(set(index) - current_tiles):
        (tiles_dir / f"{name}.png").unlink(missing_ok=True)
        del index[name]
    tiling.save_index(tiles_dir, index)

    images = pd.DataFrame(image_rows, columns=manifest.IMAGE_COLUMNS)
    objects = pd.concat(object_frames, ignore_index=True) if object_frames else pd.DataFrame()
    objects = objects.reindex(columns=manifest.OBJECT_COLUMNS)
    manifest.write_tables(stage, images, objects)
    stats = manifest.write_report(stage, images, objects, dc.classes)
    return {
        "out": str(out),
        "images": len(images),
        "objects": len(objects),
        "splits": {
            s: {"images": stats["num_images"][s], "objects": stats["num_objects"][s]}
            for s in manifest.SPLITS
        },
        "tiles": {
            "source_images_tiled": tiled,
            "tiles": len(current_tiles),
            "tiles_written": written,
        },
        "import": summary,
        "issues": [str(i) for i in log.issues[:SHOWN_ISSUES]],
        "warnings": _object_warnings(stats),
    }


def _first_corner(objs: ValidObjects, dc: DataConfig) -> np.ndarray:
    """The objects' ``first_corner`` (heading), unknown (-1) for ``dc.symmetric_classes``
    (their first corner is an arbitrary choice: no loss, no metric)."""
    symmetric = [dc.classes.index(c) + 1 for c in dc.symmetric_classes]
    return np.where(np.isin(objs.labels, symmetric), -1, objs.first_corner).astype(np.int64)


def _object_warnings(stats: dict) -> list[str]:
    """A dataset (or a split) with images but no objects trains a detector of nothing."""
    objects, images = stats["num_objects"], stats["num_images"]
    if sum(objects.values()) == 0:
        return [
            "the dataset has no objects at all: every image is background, a detector cannot "
            "learn from it (check data.classes and import_issues.txt)"
        ]
    return [
        f"the {s} split has {images[s]} images but no objects"
        for s in manifest.SPLITS
        if images[s] and not objects[s]
    ]


def _link_tiles(src: Path, dst: Path, index: dict) -> None:
    """Hard-link (or copy) the tiles ``index`` lists from ``src`` into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in index:
        tile = src / f"{name}.png"
        if tile.is_file():
            try:
                os.link(tile, dst / tile.name)
            except OSError:
                shutil.copy2(tile, dst / tile.name)


def format_summary(result: dict) -> str:
    """A few human-readable lines about a :func:`prepare` result (what the CLI prints)."""
    imp = result["import"]
    im, ob = imp["images"], imp["objects"]
    lines = [
        f"prepared {result['images']} images, {result['objects']} objects -> {result['out']}",
        "  split: "
        + ", ".join(
            f"{k} {v['images']} images / {v['objects']} objects"
            for k, v in result["splits"].items()
        ),
        f"  import ({imp['format']} from {imp['root']}, on_error={imp['on_error']}): "
        f"images {im['kept']} kept, {im['dropped']} dropped; "
        f"objects {ob['kept']} kept, {ob['repaired']} repaired, {ob['dropped']} dropped",
    ]
    for title, counts in (
        ("images dropped", im["dropped_by_reason"]),
        ("objects dropped", ob["dropped_by_reason"]),
        ("repaired", ob["repaired_by_reason"]),
        ("warnings", imp["warnings_by_reason"]),
    ):
        if counts:
            lines.append(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if result["tiles"]["tiles"]:
        t = result["tiles"]
        lines.append(
            f"  tiles: {t['tiles']} from {t['source_images_tiled']} images ({t['tiles_written']} written)"
        )
    lines += [f"  warning: {w}" for w in result.get("warnings", [])]
    if result["issues"]:
        more = imp["num_issues"] - len(result["issues"])
        lines.append(
            "  issues:"
            + (f" (first {len(result['issues'])}; all in import_issues.txt)" if more > 0 else "")
        )
        lines += [f"    {i}" for i in result["issues"]]
    return "\n".join(lines)
