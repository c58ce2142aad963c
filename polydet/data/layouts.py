"""Where each format keeps its images and labels under the dataset root (``data.root``).

| format | images | labels (for image ``images/<id>.<ext>``) |
| --- | --- | --- |
| ``dota`` | ``images/`` | ``labelTxt/<id>.txt`` |
| ``yolo_obb`` | ``images/`` | ``labels/<id>.txt`` |
| ``icdar15`` | ``images/`` | ``gt/<dir>/gt_<name>.txt`` (``<id>`` = ``<dir>/<name>``) |
| ``coco`` | ``images/<file_name>`` | ``annotations.json`` |

Images may sit in subdirectories; an image's id is its path below ``images/`` without the
extension (``/``-separated). Pairing problems are import issues (``polydet.data.validate``):
a label file without an image, an image without a label file (create an empty one for a
negative image), two images with one id, a path leading outside the root (``..``, an
absolute COCO ``file_name``, a symlink), and every unreadable, empty or truncated image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from polydet.data import formats
from polydet.data import validate as v
from polydet.data.validate import ImportLog, check_image, inside_root, where
from polydet.core.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LABEL_DIRS = {"dota": "labelTxt", "yolo_obb": "labels", "icdar15": "gt"}
COCO_FILE = "annotations.json"


@dataclass(frozen=True)
class SourceImage:
    """An image of the raw dataset that can be decoded, with its parsed (unchecked) objects."""

    image_id: str
    path: Path
    width: int
    height: int
    objects: list[formats.Annotation]
    locations: list[str]  # where each object came from, for issues


def _label_path(root: Path, fmt: str, image_id: str) -> Path:
    if fmt == "icdar15":
        p = PurePosixPath(image_id)
        return root / LABEL_DIRS[fmt] / p.parent / f"gt_{p.name}.txt"
    return root / LABEL_DIRS[fmt] / f"{image_id}.txt"


def _count_records(path: Path) -> int:
    """Object lines of a label file (for counting what a dropped image takes with it)."""
    try:
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except OSError:
        return 0
    return sum(1 for x in lines if x.strip() and not x.startswith(("imagesource:", "gsd:")))


def _scan_images(root: Path, log: ImportLog) -> dict[str, Path]:
    """``{image_id: path}`` of every image file under ``root/images`` (sorted ids)."""
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: no images directory (expected {root}/images/)")
    found: dict[str, Path] = {}
    for p in sorted(images_dir.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.is_dir():
            continue
        image_id = p.relative_to(images_dir).with_suffix("").as_posix()
        if not inside_root(p, root):
            log.drop_image(where(p), v.PATH_ESCAPE, f"resolves to {p.resolve()}")
        elif image_id in found:
            log.drop_image(where(p), v.DUPLICATE_IMAGE, f"{image_id!r} is also {found[image_id]}")
        else:
            found[image_id] = p
    return found


def _read_labels(
    path: Path, fmt: str, size: tuple[int, int], classes: Sequence[str], log: ImportLog
) -> list:
    if fmt == "dota":
        return formats.read_dota(path, log).objects
    if fmt == "yolo_obb":
        return formats.read_yolo_obb(path, size[0], size[1], classes, log)
    return formats.read_icdar15(path, classes[0], log)


def _read_label_dirs(
    root: Path, fmt: str, classes: Sequence[str], log: ImportLog
) -> list[SourceImage]:
    images = _scan_images(root, log)
    labels_dir = root / LABEL_DIRS[fmt]
    if not labels_dir.is_dir():
        raise DataError(f"{labels_dir}: no label directory (the {fmt} layout keeps labels there)")
    wanted = {_label_path(root, fmt, i): i for i in images}
    for p in sorted(labels_dir.rglob("*.txt")):
        if p not in wanted:
            log.drop_image(
                where(p),
                v.NO_IMAGE,
                f"no image {p.stem} under {root / 'images'}",
                _count_records(p),
            )
    out = []
    for image_id, path in images.items():
        label = _label_path(root, fmt, image_id)
        if not label.is_file():
            log.drop_image(where(path), v.NO_LABELS, f"expected {label}")
            continue
        if not inside_root(label, root):
            log.drop_image(
                where(label), v.PATH_ESCAPE, f"resolves to {label.resolve()}", _count_records(label)
            )
            continue
        try:  # an undecodable label file loses the whole image: say so before decoding it
            label.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            log.drop_image(where(label), v.UNREADABLE_FILE, str(e), _count_records(label))
            continue
        size = check_image(path, log, _count_records(label))
        if size is None:
            continue
        objs = _read_labels(label, fmt, size, classes, log)
        out.append(
            SourceImage(
                image_id, path, size[0], size[1], objs, [where(label, o.line) for o in objs]
            )
        )
    return out


def _read_coco(root: Path, log: ImportLog) -> list[SourceImage]:
    ann = root / COCO_FILE
    if not ann.is_file():
        raise DataError(f"{ann}: no COCO annotation file (the coco layout keeps it there)")
    data = formats.read_coco(ann, log)
    images_dir = root / "images"
    out, seen = [], set()
    for n, im in enumerate(data.images):
        objs = data.objects.get(im.id, [])
        loc = where(ann, item=f"images[{n}] (id {im.id})")
        rel = PurePosixPath(im.file_name)
        path = images_dir / rel
        if rel.is_absolute() or ".." in rel.parts or not inside_root(path, root):
            log.drop_image(loc, v.PATH_ESCAPE, f"file_name {im.file_name!r}", len(objs))
            continue
        image_id = rel.with_suffix("").as_posix()
        if image_id in seen:
            log.drop_image(loc, v.DUPLICATE_IMAGE, f"{image_id!r} listed twice", len(objs))
            continue
        seen.add(image_id)
        size = check_image(path, log, len(objs), referenced_by=loc)
        if size is None:
            continue
        if size != (im.width, im.height):
            log.warn(
                loc,
                v.SIZE_MISMATCH,
                f"file is {size[0]}x{size[1]}, JSON says {im.width}x{im.height}; using the file's",
            )
        locs = [where(ann, item=f"annotations[{o.line - 1}]") for o in objs]
        out.append(SourceImage(image_id, path, size[0], size[1], objs, locs))
    return sorted(out, key=lambda s: s.image_id)


def read_dataset(
    root: str | Path, fmt: str, classes: Sequence[str], log: ImportLog
) -> list[SourceImage]:
    """Every usable image of the dataset at ``root`` in format ``fmt`` with its parsed
    objects, sorted by id; problems go to ``log``. A missing root or layout directory is a
    :class:`~polydet.core.errors.DataError` whatever the policy (nothing could be imported)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: dataset root does not exist (for the default data run `polydet synth`)"
        )
    if fmt == "coco":
        return _read_coco(root, log)
    if fmt in LABEL_DIRS:
        if fmt == "icdar15" and len(classes) != 1:
            raise DataError(
                f"{root}: icdar15 has one class (text); data.classes lists {len(classes)}"
            )
        return _read_label_dirs(root, fmt, classes, log)
    raise DataError(f"{root}: unknown format {fmt!r}")
