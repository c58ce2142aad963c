"""The prepare stage: read the raw dataset, validate, tile, split, write the manifest.

``prepare(cfg)`` reads ``cfg.data.root`` in ``cfg.data.format`` (layouts in
:mod:`polydet.data.layouts`), checks every record (:mod:`polydet.data.validate`, policy
``cfg.data.on_error``), tiles images larger than ``cfg.data.tile.size`` when tiling is
enabled, splits by *source* image (tiles of one image never straddle splits) and writes
under ``cfg.data.out``: ``images.csv``, ``objects.csv``, ``import_summary.json``,
``import_issues.txt``, ``stats.json``, ``stats.md``, histogram PNGs and ``tiles/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from polydet.config import Config, DataConfig
from polydet.data import manifest, tiling
from polydet.data.layouts import SourceImage, read_dataset
from polydet.data.validate import ImportLog, ValidObjects, validate_objects
from polydet.errors import DataError

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
    written); a data problem under ``stop`` raises :class:`~polydet.errors.DataError`."""
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
    """Run the prepare stage (module docstring); returns a JSON-able summary."""
    dc = cfg.data
    out = Path(dc.out)
    imp = import_dataset(dc)
    sources, valid, log, summary = imp.sources, imp.objects, imp.log, imp.summary
    log.write(out, summary)
    if not sources:
        raise DataError(f"{dc.root}: no usable image (see {out / 'import_issues.txt'})")

    split = manifest.split_ids([s.image_id for s in sources], dc.split)
    tiles_dir = out / "tiles"
    index = tiling.load_index(tiles_dir)
    image_rows, object_frames = [], []
    tiled = written = 0
    current_tiles: set[str] = set()
    for src, objs in zip(sources, valid):
        part = split[src.image_id]
        t = dc.tile
        if t.enabled and (src.width > t.size or src.height > t.size):
            grid = tiling.tile_grid(src.width, src.height, t.size, t.overlap)
            paths, n = tiling.write_tiles(src.path, src.image_id, grid, tiles_dir, index)
            tiled, written = tiled + 1, written + n
            for box, path in zip(grid, paths):
                name = tiling.tile_name(src.image_id, box)
                current_tiles.add(name)
                boxes, idx, clipped = tiling.tile_objects(objs.polyboxes, box, t.min_visible)
                trunc = objs.truncated[idx] | clipped
                size = (box[2] - box[0], box[3] - box[1])
                image_rows.append((name, str(path), *size, part, len(idx)))
                object_frames.append(
                    manifest.object_rows(
                        name, part, boxes, objs.labels[idx], objs.difficult[idx], trunc, dc.classes
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
    manifest.write_tables(out, images, objects)
    stats = manifest.write_report(out, images, objects, dc.classes)
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
    }


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
    if result["issues"]:
        more = imp["num_issues"] - len(result["issues"])
        lines.append(
            "  issues:"
            + (f" (first {len(result['issues'])}; all in import_issues.txt)" if more > 0 else "")
        )
        lines += [f"    {i}" for i in result["issues"]]
    return "\n".join(lines)
