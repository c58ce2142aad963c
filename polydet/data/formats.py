"""Label formats, read and written: DOTA ``labelTxt``, YOLO-OBB, COCO polygons, ICDAR 2015,
DOTA Task1 result files and COCO result JSON.

Readers parse one file into :class:`Annotation` records (corners in image pixels, in the
order the file lists them) and report every malformed record to an
:class:`~polydet.data.validate.ImportLog` (default: stop at the first error, raising
:class:`~polydet.core.errors.DataError` as ``"<file>:<line>: <reason>: <detail>"``). Geometry
and class checks are :func:`polydet.data.validate.validate_objects`' job, except in
:func:`read_dota_labels`, the all-in-one reader evaluation uses.

Writers format coordinates so that ``read -> write -> read`` gives identical values: the
shortest repr of each float (integers without ``.0``) for DOTA, ICDAR and COCO; YOLO-OBB
stores ``x / width``, so its round trip is exact up to one float rounding (1e-9 px).
Task1 and COCO results are rounded to 0.01 px and 6 significant digits of score (detector
output; the rounded values then round-trip exactly).

Formats in brief:

- DOTA v1/v1.5 ``labelTxt``: optional ``imagesource:...`` and ``gsd:...`` header lines, then
  ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult`` (``difficult`` 0/1, may be omitted = 0).
- YOLO-OBB: ``class_index x1 y1 ... x4 y4`` normalized by image width/height.
- COCO: ``images`` / ``annotations`` / ``categories``; ``segmentation`` is a list of polygons
  (4 points used as they are; more points, or several parts, reduced to one quad by the rule
  in :mod:`polydet.data.quads`, counted as repaired); ``iscrowd: 1`` = difficult. RLE masks
  are not polygons: rejected.
- ICDAR 2015: ``x1,y1,...,x4,y4,transcription`` (UTF-8, usually with a BOM; the
  transcription may contain commas); transcription ``###`` = don't care = difficult.
- DOTA Task1 results: one ``Task1_<class>.txt`` per class, ``image_id score x1 y1 ... y4``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from polydet.geometry import heading, polybox
from polydet.data import validate as v
from polydet.data.quads import polygon_to_quad
from polydet.data.validate import ImportLog, where
from polydet.core.errors import DataError
from polydet.core.files import write_text

# ICDAR 2015's "don't care" transcription.
DONT_CARE = "###"


@dataclass(frozen=True)
class Annotation:
    """One labelled quadrilateral as a file states it."""

    points: tuple[float, ...]  # (x1, y1, ..., x4, y4), image pixels, in the file's order
    cls: str
    difficult: bool = False  # DOTA difficult / ICDAR "###" / COCO iscrowd: ignored by evaluation
    text: str = ""  # ICDAR transcription
    line: int = field(default=0, compare=False)  # 1-based source line (COCO: item index + 1)

    def corners(self) -> np.ndarray:
        """Corners ``[4, 2]`` float64 in the file's order."""
        return np.asarray(self.points, dtype=np.float64).reshape(4, 2)

    def polybox(self) -> Tensor:
        """Canonical polybox ``[10]`` float32."""
        return polybox.from_corners(
            torch.tensor(self.points, dtype=torch.float64).view(4, 2)
        ).float()


@dataclass(frozen=True)
class DotaLabels:
    """A DOTA ``labelTxt`` file: header fields and objects."""

    objects: list[Annotation]
    imagesource: str | None = None
    gsd: str | None = None


@dataclass(frozen=True)
class Detection:
    """One detection of a DOTA Task1 / COCO result file."""

    image_id: str
    score: float
    points: tuple[float, ...]  # (x1, y1, ..., x4, y4) image pixels


@dataclass(frozen=True)
class CocoImage:
    """An entry of a COCO file's ``images`` list."""

    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class CocoDataset:
    """A COCO polygon file: images, ``{category_id: name}`` and objects per image id."""

    images: list[CocoImage]
    categories: dict[int, str]
    objects: dict[int, list[Annotation]]


# --- small helpers ------------------------------------------------------------------------


def _num(x: float) -> str:
    """Shortest exact text of a float; integral values without '.0'."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _read_text(path: Path, log: ImportLog, encoding: str = "utf-8-sig") -> str | None:
    """File text (a UTF-8 BOM is dropped), or ``None`` after logging why not."""
    try:
        data = Path(path).read_bytes()
        return data.decode(encoding)
    except OSError as e:
        log.drop_image(where(path), v.UNREADABLE_FILE, str(e))
    except UnicodeDecodeError as e:  # binary garbage: name the line it starts on
        line = data[: e.start].count(b"\n") + 1
        log.drop_image(
            where(path, line),
            v.UNREADABLE_FILE,
            f"not {encoding.removesuffix('-sig').upper()} text (byte {data[e.start]:#04x})",
        )
    return None


def _floats(fields: Sequence[str], loc: str, log: ImportLog) -> list[float] | None:
    """Parse coordinate fields; logs "not a number" / "non-finite coordinate" and returns None."""
    out = []
    for f in fields:
        try:
            x = float(f)
        except ValueError:
            log.drop_object(loc, v.NOT_A_NUMBER, f"{f!r}")
            return None
        if not math.isfinite(x):
            log.drop_object(loc, v.NON_FINITE, f"{f!r}")
            return None
        out.append(x)
    return out


def _field_count(
    fields: Sequence[str], counts: tuple[int, ...], layout: str, loc: str, log: ImportLog
) -> bool:
    """Whether a record has one of ``counts`` fields; else logs "wrong field count" against
    the ``layout`` expected."""
    if len(fields) in counts:
        return True
    log.drop_object(loc, v.WRONG_FIELDS, f"expected {layout}, got {len(fields)}")
    return False


def _empty(path: Path, text: str, log: ImportLog) -> bool:
    """Warn about (and report) a label file with no content at all: image kept, no objects."""
    if text.strip():
        return False
    log.warn(where(path), v.EMPTY_FILE, "no objects; image kept as a negative")
    return True


# --- DOTA labelTxt --------------------------------------------------------------------------


def _is_header(line: str) -> bool:
    """An ``imagesource:...`` or ``gsd:...`` line (stripped) of a ``labelTxt`` file."""
    return ":" in line and line.split(":", 1)[0] in ("imagesource", "gsd")


def read_dota(path: str | Path, log: ImportLog | None = None) -> DotaLabels:
    """Parse a DOTA v1/v1.5 ``labelTxt`` file (no geometry checks)."""
    path, log = Path(path), log or ImportLog()
    text = _read_text(path, log)
    if text is None or _empty(path, text, log):
        return DotaLabels([])
    header: dict[str, str] = {}
    objects = []
    # Lines end at "\n" only (str.splitlines also splits at \x1c, \x85, ...: a garbage line
    # would shift every line number after it).
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        if _is_header(line):
            key, value = line.split(":", 1)
            header[key] = value.strip()
            continue
        loc = where(path, lineno)
        fields = line.split()
        if not _field_count(fields, (9, 10), "10 (x1 y1 ... x4 y4 class difficult)", loc, log):
            continue
        coords = _floats(fields[:8], loc, log)
        if coords is None:
            continue
        flag = fields[9] if len(fields) == 10 else "0"
        if flag not in ("0", "1"):
            log.drop_object(loc, v.BAD_DIFFICULT, f"expected 0 or 1, got {flag!r}")
            continue
        objects.append(Annotation(tuple(coords), fields[8], flag == "1", line=lineno))
    return DotaLabels(objects, header.get("imagesource"), header.get("gsd"))


def write_dota(
    path: str | Path,
    objects: Sequence[Annotation],
    imagesource: str | None = None,
    gsd: str | None = None,
) -> None:
    """Write a DOTA ``labelTxt`` file (header lines only for the fields given)."""
    lines = []
    if imagesource is not None:
        lines.append(f"imagesource:{imagesource}")
    if gsd is not None:
        lines.append(f"gsd:{gsd}")
    for o in objects:
        if any(c.isspace() for c in o.cls) or not o.cls:
            raise ValueError(f"DOTA class names cannot be empty or contain spaces: {o.cls!r}")
        coords = " ".join(_num(x) for x in o.points)
        lines.append(f"{coords} {o.cls} {int(o.difficult)}")
    Path(path).write_text("".join(f"{x}\n" for x in lines))


def read_dota_arrays(
    paths: Sequence[str | Path],
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Objects of many ``labelTxt`` files as flat arrays, as :func:`read_dota` parses them (no
    geometry checks): image index ``[G]`` (position in ``paths``), class names ``[G]``,
    corners ``[G, 8]`` float64 in the files' order, difficult ``[G]`` bool.

    Well-formed files go through one pandas parse (~10x faster than file by file); anything
    irregular sends every file through :func:`read_dota`, which raises a
    :class:`~polydet.core.errors.DataError` naming the file and line.
    """
    fast = _dota_table(paths)
    if fast is not None:
        return fast
    rows = [(i, o) for i, p in enumerate(paths) for o in read_dota(p).objects]
    return (
        np.array([i for i, _ in rows], np.int64),
        [o.cls for _, o in rows],
        np.array([o.points for _, o in rows], np.float64).reshape(-1, 8),
        np.array([o.difficult for _, o in rows], bool),
    )


def _dota_table(
    paths: Sequence[str | Path],
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray] | None:
    """:func:`read_dota_arrays` of well-formed files in one pandas parse; ``None`` when
    anything is irregular (then :func:`read_dota` names the bad line)."""
    lines = []
    for i, path in enumerate(paths):
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError):
            return None
        for line in text.splitlines():
            line = line.strip()
            if line and not _is_header(line):
                lines.append(f"{i} {line}")
    if not lines:
        return np.zeros(0, np.int64), [], np.zeros((0, 8)), np.zeros(0, bool)
    try:
        df = _read_table(io.StringIO("\n".join(lines)), {0: np.int64, 9: str, 10: str}, 11)
        corners = df.iloc[:, 1:9].to_numpy(np.float64)
    except (pd.errors.ParserError, ValueError, TypeError):
        return None
    flag = df[10].to_numpy(str)
    if not np.isfinite(corners).all() or not np.isin(flag, ["0", "1", ""]).all():
        return None
    if (df[9].to_numpy(str) == "").any():  # fewer than 9 fields
        return None
    return df[0].to_numpy(np.int64), df[9].tolist(), corners, flag == "1"


def _read_table(source: object, dtype: dict, width: int | None = None) -> pd.DataFrame:
    """Whitespace-separated fields (at most ``width`` a line; default: the first line's) by
    pandas' C parser: no quoting, no "NA" strings (an image id or class may be spelled so),
    missing fields ``""``."""
    return pd.read_csv(
        source, sep=r"\s+", header=None, names=range(width) if width else None, dtype=dtype,
        quoting=csv.QUOTE_NONE, engine="c", keep_default_na=False,
    )  # fmt: skip


def read_dota_labels(path: str | Path, on_error: v.OnError = "stop") -> list[Annotation]:
    """Objects of a DOTA ``labelTxt`` file, checked: malformed lines, non-finite, zero-area and
    non-convex quads raise :class:`~polydet.core.errors.DataError` naming file and line
    (``on_error="skip"``: left out); self-intersecting quads come back in hull order."""
    log = ImportLog(on_error)
    objs = read_dota(path, log).objects
    locs = [where(path, o.line) for o in objs]
    valid = v.validate_objects(objs, locs, sorted({o.cls for o in objs}), log)
    out = []
    for box, i, fixed in zip(valid.polyboxes, valid.index, valid.repaired):
        o = objs[i]
        if fixed:  # a bow tie: the file's order is not a ring, the hull order is
            c = polybox.to_corners(torch.from_numpy(box)).reshape(-1)
            o = Annotation(tuple(float(x) for x in c), o.cls, o.difficult, o.text, o.line)
        out.append(o)
    return out


# --- YOLO-OBB -------------------------------------------------------------------------------


def read_yolo_obb(
    path: str | Path,
    width: int,
    height: int,
    classes: Sequence[str],
    log: ImportLog | None = None,
) -> list[Annotation]:
    """Parse a YOLO-OBB label file (``class_index x1 y1 ... y4``, normalized) into pixels of a
    ``width`` x ``height`` image; class indices are 0-based into ``classes``."""
    path, log = Path(path), log or ImportLog()
    text = _read_text(path, log)
    if text is None or _empty(path, text, log):
        return []
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields:
            continue
        loc = where(path, lineno)
        if not _field_count(fields, (9,), "9 (class x1 y1 ... x4 y4)", loc, log):
            continue
        try:
            k = int(fields[0])
        except ValueError:
            log.drop_object(loc, v.NOT_A_NUMBER, f"class index {fields[0]!r}")
            continue
        if not 0 <= k < len(classes):
            log.drop_object(loc, v.UNKNOWN_CLASS, f"class index {k} outside 0..{len(classes) - 1}")
            continue
        coords = _floats(fields[1:], loc, log)
        if coords is None:
            continue
        pts = tuple(c * (width if j % 2 == 0 else height) for j, c in enumerate(coords))
        out.append(Annotation(pts, classes[k], line=lineno))
    return out


def write_yolo_obb(
    path: str | Path, objects: Sequence[Annotation], width: int, height: int, classes: Sequence[str]
) -> None:
    """Write a YOLO-OBB label file (coordinates divided by the image size)."""
    index = {c: i for i, c in enumerate(classes)}
    lines = []
    for o in objects:
        norm = (x / (width if j % 2 == 0 else height) for j, x in enumerate(o.points))
        lines.append(f"{index[o.cls]} " + " ".join(repr(float(x)) for x in norm))
    Path(path).write_text("".join(f"{x}\n" for x in lines))


# --- COCO polygons --------------------------------------------------------------------------


def _coco_polygon(seg: object, loc: str, log: ImportLog) -> tuple[float, ...] | None:
    """A COCO ``segmentation`` as one quad (rule in polydet.data.quads), or None (logged)."""
    if not isinstance(seg, list) or not seg or not all(isinstance(p, list) for p in seg):
        kind = "an RLE mask" if isinstance(seg, dict) else type(seg).__name__
        log.drop_object(loc, v.BAD_RECORD, f"segmentation is {kind}, expected polygon lists")
        return None
    flat: list[float] = []
    for part in seg:
        if len(part) < 6 or len(part) % 2:
            log.drop_object(
                loc, v.BAD_RECORD, f"polygon of {len(part)} numbers, expected an even count >= 6"
            )
            return None
        try:
            coords = [float(x) for x in part]
        except (TypeError, ValueError):
            log.drop_object(loc, v.NOT_A_NUMBER, f"polygon {part!r}")
            return None
        if not all(math.isfinite(x) for x in coords):
            log.drop_object(loc, v.NON_FINITE, "polygon has NaN or infinite numbers")
            return None
        flat.extend(coords)
    if len(seg) == 1 and len(flat) == 8:
        return tuple(flat)
    quad = polygon_to_quad(np.asarray(flat).reshape(-1, 2))
    if quad is None:
        log.drop_object(loc, v.ZERO_AREA, "polygon points are collinear")
        return None
    log.repair_object(loc, v.REDUCED, f"{len(seg)} part(s), {len(flat) // 2} points")
    return tuple(float(x) for x in quad.reshape(-1))


def read_coco(path: str | Path, log: ImportLog | None = None) -> CocoDataset:
    """Parse a COCO JSON file with polygon segmentations."""
    path, log = Path(path), log or ImportLog()
    text = _read_text(path, log)
    if text is None:
        return CocoDataset([], {}, {})
    if not text.strip():
        log.drop_image(where(path), v.EMPTY_FILE, "annotation file is empty")
        return CocoDataset([], {}, {})
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        log.drop_image(where(path, e.lineno), v.UNREADABLE_FILE, f"invalid JSON: {e.msg}")
        return CocoDataset([], {}, {})
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        log.drop_image(
            where(path), v.BAD_RECORD, "expected lists 'images', 'annotations', 'categories'"
        )
        return CocoDataset([], {}, {})
    categories: dict[int, str] = {}
    for n, c in enumerate(data["categories"]):
        try:
            categories[int(c["id"])] = str(c["name"])
        except (KeyError, TypeError, ValueError):
            log.warn(where(path, item=f"categories[{n}]"), v.BAD_RECORD, "needs 'id' and 'name'")
    images = []
    for n, im in enumerate(data["images"]):
        try:
            images.append(
                CocoImage(int(im["id"]), str(im["file_name"]), int(im["width"]), int(im["height"]))
            )
        except (KeyError, TypeError, ValueError):
            log.drop_image(
                where(path, item=f"images[{n}]"), v.BAD_RECORD, "needs id, file_name, width, height"
            )
    objects: dict[int, list[Annotation]] = {im.id: [] for im in images}
    for n, a in enumerate(data["annotations"]):
        loc = where(path, item=f"annotations[{n}]")
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
            log.drop_object(loc, v.BAD_RECORD, "needs image_id, category_id, segmentation")
            continue
        if a["image_id"] not in objects:
            log.drop_object(loc, v.BAD_RECORD, f"image_id {a['image_id']!r} is not in 'images'")
            continue
        if a["category_id"] not in categories:
            log.drop_object(loc, v.UNKNOWN_CLASS, f"category_id {a['category_id']!r}")
            continue
        pts = _coco_polygon(a.get("segmentation"), loc, log)
        if pts is None:
            continue
        crowd = a.get("iscrowd", 0)
        objects[a["image_id"]].append(
            Annotation(pts, categories[a["category_id"]], bool(crowd), line=n + 1)
        )
    return CocoDataset(images, categories, objects)


def write_coco(path: str | Path, dataset: CocoDataset) -> None:
    """Write a COCO JSON file with one 4-point polygon per object (``iscrowd`` = difficult)."""
    ids = {name: k for k, name in dataset.categories.items()}
    anns = []
    for im in dataset.images:
        for o in dataset.objects.get(im.id, []):
            c = o.corners()
            x0, y0 = c.min(0)
            x1, y1 = c.max(0)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": im.id,
                    "category_id": ids[o.cls],
                    "segmentation": [list(o.points)],
                    "area": float(polybox.area(o.polybox().double())),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "iscrowd": int(o.difficult),
                }
            )
    data = {
        "images": [
            {"id": im.id, "file_name": im.file_name, "width": im.width, "height": im.height}
            for im in dataset.images
        ],
        "annotations": anns,
        "categories": [{"id": k, "name": n} for k, n in sorted(dataset.categories.items())],
    }
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


# --- ICDAR 2015 -----------------------------------------------------------------------------


def read_icdar15(
    path: str | Path, cls: str = "text", log: ImportLog | None = None
) -> list[Annotation]:
    """Parse an ICDAR 2015 ground-truth file (BOM optional); every object gets class ``cls``,
    transcription ``###`` marks it difficult (don't care)."""
    path, log = Path(path), log or ImportLog()
    text = _read_text(path, log, encoding="utf-8-sig")
    if text is None or _empty(path, text, log):
        return []
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        loc = where(path, lineno)
        fields = raw.split(",", 8)
        if not _field_count(fields, (9,), "9 (x1,y1,...,x4,y4,transcription)", loc, log):
            continue
        coords = _floats(fields[:8], loc, log)
        if coords is None:
            continue
        words = fields[8]
        out.append(Annotation(tuple(coords), cls, words == DONT_CARE, words, line=lineno))
    return out


def write_icdar15(path: str | Path, objects: Sequence[Annotation]) -> None:
    """Write an ICDAR 2015 file (UTF-8 with BOM, as the benchmark ships); a difficult object
    without transcription is written as ``###``."""
    lines = []
    for o in objects:
        words = DONT_CARE if o.difficult and not o.text else o.text
        if "\n" in words or "\r" in words:
            raise ValueError(f"an ICDAR transcription cannot span lines: {words!r}")
        lines.append(",".join(_num(x) for x in o.points) + "," + words)
    Path(path).write_text("".join(f"{x}\n" for x in lines), encoding="utf-8-sig")


# --- DOTA Task1 and COCO results --------------------------------------------------------------


def _per_class(
    detections: Mapping[str, Mapping[str, object]], classes: Sequence[str]
) -> dict[str, list[Detection]]:
    """Model outputs ``{image_id: {"polyboxes" [K,10], "scores" [K], "labels" [K] 1-based}}``
    -> ``{class: [Detection]}`` rounded as written (0.01 px, 6 significant digits of score);
    with ``"first_corner" [K]`` (the heading), the corners start there, as DOTA lists them."""
    out: dict[str, list[Detection]] = {c: [] for c in classes}
    for image_id in sorted(detections):
        d = detections[image_id]
        boxes = torch.as_tensor(d["polyboxes"]).reshape(-1, 10).double()
        scores = torch.as_tensor(d["scores"]).reshape(-1).tolist()
        labels = torch.as_tensor(d["labels"]).reshape(-1).tolist()
        corners = polybox.to_corners(boxes)
        if "first_corner" in d:
            first = torch.as_tensor(d["first_corner"]).reshape(-1)
            corners = heading.start_at_first(corners, first)
        corners = corners.reshape(-1, 8).tolist()
        for pts, s, k in zip(corners, scores, labels):
            if not 1 <= int(k) <= len(classes):
                raise ValueError(f"{image_id}: label {k} outside 1..{len(classes)}")
            p = tuple(float(f"{x:.2f}") for x in pts)
            out[classes[int(k) - 1]].append(Detection(image_id, float(f"{s:.6g}"), p))
    return out


def write_task1(
    out_dir: str | Path,
    detections: Mapping[str, Mapping[str, object]],
    classes: Sequence[str],
) -> list[Path]:
    """Write DOTA Task1 result files ``Task1_<class>.txt`` (one per class, empty ones too)
    from ``{image_id: {"polyboxes" [K,10], "scores" [K], "labels" [K] (1-based)}}``
    (the output of ``PolyDetector.predict``); returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for cls, dets in _per_class(detections, classes).items():
        if any(c.isspace() for c in cls) or "/" in cls:
            raise ValueError(f"class name {cls!r} cannot be a Task1 file name")
        lines = [
            f"{d.image_id} {d.score:.6g} " + " ".join(f"{x:.2f}" for x in d.points) for d in dets
        ]
        p = out_dir / f"Task1_{cls}.txt"
        write_text(p, "".join(f"{x}\n" for x in lines))  # atomic: the old file or the new
        paths.append(p)
    return paths


def read_task1(path: str | Path, log: ImportLog | None = None) -> list[Detection]:
    """Parse one Task1 result file (``image_id score x1 y1 ... x4 y4`` per line).

    A well-formed file goes through one pandas parse (:func:`_task1_table`, ~20x faster than
    the line loop); any irregularity through the line loop, which reports it to ``log``.
    """
    path, log = Path(path), log or ImportLog()
    fast = _task1_table(path)
    if fast is not None:
        ids, scores, corners = fast
        return [
            Detection(i, s, tuple(c))
            for i, s, c in zip(ids, scores.tolist(), corners.tolist(), strict=True)
        ]
    text = _read_text(path, log)
    if text is None:
        return []
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields:
            continue
        loc = where(path, lineno)
        if not _field_count(fields, (10,), "10 (image_id score x1 y1 ... x4 y4)", loc, log):
            continue
        nums = _floats(fields[1:], loc, log)
        if nums is None:
            continue
        out.append(Detection(fields[0], nums[0], tuple(nums[1:])))
    return out


def read_task1_arrays(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A Task1 result file as arrays: image ids ``[n]``, scores ``[n]`` float64 and corners
    ``[n, 8]`` float64, in line order (what :func:`read_task1` reads, without a Python object
    per detection). An irregular file raises a :class:`~polydet.core.errors.DataError` naming the
    file and line."""
    fast = _task1_table(path)
    if fast is not None:
        return fast
    dets = read_task1(path)  # raises at the first bad line
    return (
        [d.image_id for d in dets],
        np.array([d.score for d in dets], np.float64),
        np.array([d.points for d in dets], np.float64).reshape(-1, 8),
    )


def _task1_table(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """:func:`read_task1_arrays` of a well-formed file in one pandas parse; ``None`` when
    anything is irregular or unreadable."""
    try:
        df = _read_table(path, {0: str})
        nums = df.iloc[:, 1:].to_numpy(np.float64) if df.shape[1] == 10 else None
    except pd.errors.EmptyDataError:
        return [], np.zeros(0), np.zeros((0, 8))
    except (pd.errors.ParserError, ValueError, TypeError, UnicodeDecodeError, OSError):
        return None
    if nums is None or not np.isfinite(nums).all():
        return None
    return df[0].tolist(), nums[:, 0].copy(), nums[:, 1:].copy()


def read_task1_dir(
    directory: str | Path, log: ImportLog | None = None
) -> dict[str, list[Detection]]:
    """``{class: [Detection]}`` from every ``Task1_<class>.txt`` in ``directory``."""
    directory, log = Path(directory), log or ImportLog()
    if not directory.is_dir():
        log.drop_image(where(directory), v.UNREADABLE_FILE, "not a directory")
        return {}
    return {
        p.stem.removeprefix("Task1_"): read_task1(p, log)
        for p in sorted(directory.glob("Task1_*.txt"))
    }


def detections_by_image(
    per_class: Mapping[str, Sequence[Detection]], classes: Sequence[str]
) -> dict[str, dict[str, Tensor]]:
    """Inverse of what :func:`write_task1` groups: ``{image_id: {"polyboxes" [K,10] float32,
    "scores" [K], "labels" [K] int64 (1-based)}}``; classes not in ``classes`` raise ValueError."""
    index = {c: i + 1 for i, c in enumerate(classes)}
    rows: dict[str, list[tuple[tuple[float, ...], float, int]]] = {}
    for cls, dets in per_class.items():
        if cls not in index:
            raise ValueError(f"detections of class {cls!r}, which is not one of {list(classes)}")
        for d in dets:
            rows.setdefault(d.image_id, []).append((d.points, d.score, index[cls]))
    out = {}
    for image_id, r in rows.items():
        pts = torch.tensor([x[0] for x in r], dtype=torch.float64).view(-1, 4, 2)
        out[image_id] = {
            "polyboxes": polybox.from_corners(pts).float(),
            "scores": torch.tensor([x[1] for x in r], dtype=torch.float32),
            "labels": torch.tensor([x[2] for x in r], dtype=torch.int64),
        }
    return out


def write_coco_results(
    path: str | Path,
    detections: Mapping[str, Mapping[str, object]],
    classes: Sequence[str],
    image_ids: Mapping[str, int] | None = None,
) -> None:
    """Write COCO results JSON (``image_id, category_id, segmentation, bbox, score`` per
    detection); category ids are 1-based class indices; ``image_ids`` maps our string ids to
    COCO's integers (default: 1, 2, ... in sorted order)."""
    ids = image_ids or {k: i + 1 for i, k in enumerate(sorted(detections))}
    index = {c: i + 1 for i, c in enumerate(classes)}
    out = []
    for cls, dets in _per_class(detections, classes).items():
        for d in dets:
            xs, ys = d.points[0::2], d.points[1::2]
            out.append(
                {
                    "image_id": ids[d.image_id],
                    "category_id": index[cls],
                    "segmentation": [list(d.points)],
                    "bbox": [
                        min(xs),
                        min(ys),
                        round(max(xs) - min(xs), 2),
                        round(max(ys) - min(ys), 2),
                    ],
                    "score": d.score,
                }
            )
    Path(path).write_text(json.dumps(out) + "\n")


def read_coco_results(
    path: str | Path, classes: Sequence[str], image_ids: Mapping[str, int] | None = None
) -> dict[str, list[Detection]]:
    """``{class: [Detection]}`` from a COCO results file written by :func:`write_coco_results`
    (``image_ids`` as given there; default: COCO's integer ids as strings)."""
    path = Path(path)
    names = {i: k for k, i in (image_ids or {}).items()}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable COCO results: {e}") from e
    out: dict[str, list[Detection]] = {c: [] for c in classes}
    for n, r in enumerate(data):
        try:
            cls = classes[int(r["category_id"]) - 1]
            pts = tuple(float(x) for x in r["segmentation"][0])
            out[cls].append(
                Detection(names.get(r["image_id"], str(r["image_id"])), float(r["score"]), pts)
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise DataError(f"{path}: results[{n}]: {v.BAD_RECORD}: {e}") from e
    return out
