"""Import validation: every record is checked, every problem is named, nothing is lost silently.

Each problem becomes an :class:`Issue` naming the file and line (or JSON item) and one of the
stable reasons below. What happens to the record:

- **dropped** (an error): under ``data.on_error: stop`` the first one raises
  :class:`~polydet.core.errors.DataError` with the issue as its message; under ``skip`` the record
  (or the whole image, for image-level problems) is left out and the import goes on.
- **repaired** (a warning, never stops): the record is kept in a corrected form.
- **warning** (never stops): the record is kept as is (e.g. an empty label file).

Geometry rules (see ``polydet.polybox``): self-intersecting -> repaired (hull order);
non-convex, zero-area, non-finite -> dropped. A quad reaching more than ``EDGE_TOLERANCE``
pixels outside the image is clipped to it and marked ``truncated`` (repaired, "clipped to
image") when at least ``data.min_inside`` of its area is inside, else dropped ("far outside
image"); the clipped polygon is reduced to a quad by :mod:`polydet.data.quads`' rule.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import UnidentifiedImageError

from polydet.geometry import heading, polybox
from polydet.data.images import displayed_size, open_raw
from polydet.data.quads import clip_quad, inside_share
from polydet.core.errors import DataError

OnError = Literal["stop", "skip"]

# Annotation tools write corners on the border as x = width (or a hair beyond): not a problem.
EDGE_TOLERANCE = 1.0

# Stable reasons (summary keys; the tests assert them).
WRONG_FIELDS = "wrong field count"
NOT_A_NUMBER = "not a number"
NON_FINITE = "non-finite coordinate"
UNKNOWN_CLASS = "unknown class"
BAD_DIFFICULT = "bad difficult flag"
BAD_RECORD = "malformed record"
ZERO_AREA = "zero area"
NON_CONVEX = "non-convex"
SELF_INTERSECTING = "self-intersecting"
FAR_OUTSIDE = "far outside image"
CLIPPED = "clipped to image"
REDUCED = "polygon reduced to quad"
EMPTY_FILE = "empty file"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
TRUNCATED_IMAGE = "truncated image"
UNREADABLE_FILE = "unreadable file"
NO_IMAGE = "no image for label file"
NO_LABELS = "no label file for image"
DUPLICATE_IMAGE = "duplicate image id"
PATH_ESCAPE = "path escapes dataset root"
SIZE_MISMATCH = "image size differs from annotation"


@dataclass(frozen=True)
class Issue:
    """One problem: ``str(issue)`` is ``"<file>:<line>: <reason>: <detail> (<action>)"``."""

    location: str  # "path:line", "path: annotations[3] (id 7)" or "path"
    reason: str
    detail: str
    action: Literal["dropped", "repaired", "kept"]

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.location}: {self.reason}{detail} ({self.action})"


def where(path: str | Path, line: int | None = None, item: str | None = None) -> str:
    """Location string of an issue: ``path:line`` or ``path: item`` or ``path``."""
    if line is not None:
        return f"{path}:{line}"
    if item is not None:
        return f"{path}: {item}"
    return str(path)


class ImportLog:
    """Collects issues under a policy and counts objects/images by outcome and reason."""

    def __init__(self, on_error: OnError = "stop") -> None:
        if on_error not in ("stop", "skip"):
            raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.issues: list[Issue] = []
        self.objects_dropped: Counter[str] = Counter()
        self.repair_reasons: Counter[str] = Counter()
        self.images_dropped: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self._repaired: set[str] = set()  # locations of repaired objects
        self._dropped: set[str] = set()  # locations of dropped objects

    def _error(self, issue: Issue) -> None:
        if self.on_error == "stop":
            raise DataError(str(issue).removesuffix(" (dropped)"))
        self.issues.append(issue)

    def drop_object(self, location: str, reason: str, detail: str = "") -> None:
        """An object that cannot be used (raises under ``stop``)."""
        self._error(Issue(location, reason, detail, "dropped"))
        self.objects_dropped[reason] += 1
        self._dropped.add(location)

    def drop_image(
        self, location: str, reason: str, detail: str = "", num_objects: int = 0
    ) -> None:
        """An image (with its ``num_objects`` labelled objects) that cannot be used."""
        self._error(Issue(location, reason, detail, "dropped"))
        self.images_dropped[reason] += 1
        self.objects_dropped[reason] += num_objects

    def repair_object(self, location: str, reason: str, detail: str = "") -> None:
        """An object kept in a corrected form (never stops the import)."""
        self.issues.append(Issue(location, reason, detail, "repaired"))
        self.repair_reasons[reason] += 1
        self._repaired.add(location)

    def warn(self, location: str, reason: str, detail: str = "") -> None:
        """Something worth knowing about a record that is kept as is."""
        self.issues.append(Issue(location, reason, detail, "kept"))
        self.warnings[reason] += 1

    def summary(self, images_kept: int, objects_kept: int) -> dict:
        """JSON-able import summary given the final image and object counts.

        ``objects.kept`` counts objects kept unchanged, ``objects.repaired`` those kept in a
        corrected form (an object repaired twice counts once, under both reasons), so
        ``read = kept + repaired + dropped``.
        """
        repaired = len(self._repaired - self._dropped)
        dropped = sum(self.objects_dropped.values())
        kept = objects_kept - repaired
        images_dropped = sum(self.images_dropped.values())
        return {
            "on_error": self.on_error,
            "images": {
                "read": images_kept + images_dropped,
                "kept": images_kept,
                "dropped": images_dropped,
                "dropped_by_reason": _nonzero(self.images_dropped),
            },
            "objects": {
                "read": kept + repaired + dropped,
                "kept": kept,
                "repaired": repaired,
                "dropped": dropped,
                "repaired_by_reason": _nonzero(self.repair_reasons),
                "dropped_by_reason": _nonzero(self.objects_dropped),
            },
            "warnings_by_reason": _nonzero(self.warnings),
            "num_issues": len(self.issues),
        }

    def write(self, out_dir: Path, summary: dict) -> None:
        """Write ``import_summary.json`` and every issue, one a line, to ``import_issues.txt``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "import_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out_dir / "import_issues.txt").write_text("".join(f"{i}\n" for i in self.issues))


def _nonzero(counts: Counter[str]) -> dict[str, int]:
    return {k: v for k, v in sorted(counts.items()) if v}


def check_image(
    path: Path, log: ImportLog, num_objects: int = 0, referenced_by: str = ""
) -> tuple[int, int] | None:
    """``(width, height)`` of a fully decodable image file, else ``None`` after logging why
    (missing, empty, not an image, truncated). Decoding the whole file is what finds truncation."""
    loc = where(path)
    if not path.is_file():
        ref = f" (referenced by {referenced_by})" if referenced_by else ""
        log.drop_image(loc, MISSING_IMAGE, f"no such file{ref}", num_objects)
        return None
    if path.stat().st_size == 0:
        log.drop_image(loc, EMPTY_FILE, "image file has 0 bytes", num_objects)
        return None
    try:
        with open_raw(path) as im:
            size = displayed_size(im)  # labels are in the pixels the user sees
            im.load()
            return size
    except DataError as e:
        cause = e.__cause__
        if isinstance(cause, UnidentifiedImageError):
            message = "not an image format PIL can read"
        else:
            message = str(cause) if cause is not None else str(e).removeprefix(f"{path}: ")
        reason = TRUNCATED_IMAGE if "truncated" in message.lower() else UNREADABLE_IMAGE
        log.drop_image(loc, reason, message, num_objects)
    except (OSError, SyntaxError, ValueError) as e:
        reason = TRUNCATED_IMAGE if "truncated" in str(e).lower() else UNREADABLE_IMAGE
        log.drop_image(loc, reason, str(e), num_objects)
    return None


def inside_root(path: Path, root: Path) -> bool:
    """True when ``path`` (after resolving ``..`` and symlinks) lies inside ``root``."""
    return path.resolve().is_relative_to(root.resolve())


def _problems(corners: np.ndarray) -> np.ndarray:
    """:func:`polydet.polybox.check_corners` flags ``[N]`` of quads ``[N, 4, 2]``."""
    t = torch.from_numpy(corners)
    try:
        return polybox.check_corners(t).numpy()
    except RuntimeError:
        # check_corners as of the skeleton commit compares turns [N, 4] with a per-box
        # tolerance [N] without unsqueezing it, which fails for batches; one box at a time
        # is correct (about 1 ms each), and the batched call is used once that is fixed.
        return np.array([int(polybox.check_corners(q)) for q in t], dtype=np.int64)


@dataclass(frozen=True)
class ValidObjects:
    """The objects of one image that passed validation (N of them)."""

    polyboxes: np.ndarray  # [N, 10] float64, canonical, image pixels
    labels: np.ndarray  # [N] int64, 1-based index into the class list
    difficult: np.ndarray  # [N] bool
    truncated: np.ndarray  # [N] bool (clipped to the image)
    repaired: np.ndarray  # [N] bool (geometry changed: hull order or clipped)
    index: np.ndarray  # [N] int64, position of each survivor in the input list
    # [N] int64: the canonical corner the annotation's first vertex is (0..3; the heading,
    # polydet.geometry.heading; a clipped object keeps its first edge's nearest edge)
    first_corner: np.ndarray

    @staticmethod
    def empty() -> ValidObjects:
        """No objects."""
        no = np.zeros(0, bool)
        return ValidObjects(
            np.zeros((0, 10)),
            np.zeros(0, np.int64),
            no,
            no,
            no,
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )


def validate_objects(
    objects: Sequence,
    locations: Sequence[str],
    classes: Sequence[str],
    log: ImportLog,
    image_size: tuple[int, int] | None = None,
    min_inside: float = 0.5,
) -> ValidObjects:
    """Check objects (anything with ``.corners() -> [4, 2]``, ``.cls``, ``.difficult``), each
    at ``locations[i]``: class known, geometry valid (or repaired), inside the image of
    ``image_size = (width, height)`` (or clipped, or dropped). Returns the survivors."""
    class_index = {c: i + 1 for i, c in enumerate(classes)}
    keep: list[int] = []
    for i, obj in enumerate(objects):
        if obj.cls not in class_index:
            log.drop_object(
                locations[i], UNKNOWN_CLASS, f"{obj.cls!r} is not one of {list(classes)}"
            )
        else:
            keep.append(i)
    if not keep:
        return ValidObjects.empty()
    corners = np.stack([np.asarray(objects[i].corners(), dtype=np.float64) for i in keep])
    flags = _problems(corners)
    boxes = polybox.from_corners(torch.from_numpy(corners)).numpy()  # [K, 10] float64
    ring = polybox.to_corners(torch.from_numpy(boxes))  # [K, 4, 2]
    first = heading.nearest_corner(ring, torch.from_numpy(corners[:, 0])).numpy()  # [K]
    ok = np.ones(len(keep), bool)
    truncated = np.zeros(len(keep), bool)
    repaired = np.zeros(len(keep), bool)
    for n, i in enumerate(keep):
        f = int(flags[n])
        if f & polybox.NON_FINITE:
            ok[n] = False
            log.drop_object(locations[i], NON_FINITE, "a corner is NaN or infinite")
        elif f & polybox.ZERO_AREA:
            ok[n] = False
            log.drop_object(locations[i], ZERO_AREA, "corners are collinear or coincide")
        elif f & polybox.NON_CONVEX:
            ok[n] = False
            log.drop_object(locations[i], NON_CONVEX, "one corner lies inside the other three")
        elif f & polybox.SELF_INTERSECTING:
            repaired[n] = True
            log.repair_object(locations[i], SELF_INTERSECTING, "corners reordered to hull order")
    if image_size is not None:
        w, h = image_size
        c = polybox.to_corners(torch.from_numpy(boxes)).numpy()  # [K, 4, 2] canonical
        t = EDGE_TOLERANCE
        outside = ok & (
            (c[..., 0].min(1) < -t)
            | (c[..., 1].min(1) < -t)
            | (c[..., 0].max(1) > w + t)
            | (c[..., 1].max(1) > h + t)
        )
        if outside.any():
            share = inside_share(c[outside], (0.0, 0.0, float(w), float(h)))
            for n, s in zip(np.flatnonzero(outside), share):
                loc = locations[keep[n]]
                quad = clip_quad(c[n], (0.0, 0.0, float(w), float(h))) if s >= min_inside else None
                if quad is None:
                    ok[n] = False
                    log.drop_object(
                        loc, FAR_OUTSIDE, f"{s:.0%} of its area is inside the {w}x{h} image"
                    )
                    continue
                boxes[n] = polybox.from_corners(torch.from_numpy(quad)).numpy()
                first[n] = int(
                    heading.map_first_corner(
                        torch.from_numpy(c[n]),
                        polybox.to_corners(torch.from_numpy(boxes[n])),
                        torch.tensor(first[n]),
                    )
                )
                truncated[n] = repaired[n] = True
                log.repair_object(loc, CLIPPED, f"{s:.0%} inside; marked truncated")
    sel = [keep[n] for n in np.flatnonzero(ok)]
    return ValidObjects(
        polyboxes=boxes[ok],
        labels=np.array([class_index[objects[i].cls] for i in sel], dtype=np.int64),
        difficult=np.array([bool(objects[i].difficult) for i in sel], dtype=bool),
        truncated=truncated[ok],
        repaired=repaired[ok],
        index=np.array(sel, dtype=np.int64),
        first_corner=first[ok].astype(np.int64),
    )
