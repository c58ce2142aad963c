"""The embedded default dataset: textured, cluttered RGB images with quadrilateral objects.

``generate(cfg.synth)`` writes ``images/synth_NNNNN.png`` and ``labelTxt/synth_NNNNN.txt``
(DOTA v1.5, so it goes through the same reader as real data). Classes are shapes with
their own look, so that a small detector trained from scratch on a CPU can tell them apart:

- ``card``: a light rectangle (aspect 1.3-1.8) with a saturated border, a dark band along its
  top edge (its heading), a round "logo" and grey "text" bars, perspective-warped;
- ``plate``: an elongated rectangle (aspect 2.2-``max_aspect``), yellow or white, black
  border and dark seven-segment "characters", mostly rotated, little perspective;
- ``kite``: a kite quad (cross point in the upper third) with two saturated alternating
  panels, dark spars along the diagonals and a dark band along the edge from its tip
  clockwise (its heading: the kite is mirror-symmetric, the band tells its sides apart).

**Heading**: every label lists its corners clockwise from the sprite's top-left corner, so
its first edge is the sprite's top edge (the card's band, the plate's top, the kite's tip
and banded edge); a truncated object's label keeps that edge first
(:mod:`polydet.geometry.heading`). The bands draw no random numbers: the random stream, the
geometry and the labels' corner sets are what they were without them.

Backgrounds are muted two-colour noise with texture; clutter (scaled by ``clutter``) is lines,
small blobs, soft stains and irregular 5-7-gons: real distractors, none a bright quad.
Objects get a random rotation, corner jitter (``perspective``), size (``scale_range``: sqrt
of the area relative to the shorter image side, log-uniform), at most 15% mutual overlap,
occluding blobs (``occlusion``) and may cross the border (``truncation``; then the label is
the visible part, reduced to a quad by :mod:`polydet.data.quads`' rule, at least 55% of the
object). Occluded objects keep their full quad, as DOTA labels them.

Determinism: image ``i`` depends only on ``(seed, i)`` through a numpy generator, drawing is
PIL's (integer rasterization), PNGs are written without metadata and labels are rounded to
0.01 px, so the same parameters give byte-identical files (``data.dvc`` stays valid).
"""

from __future__ import annotations

import colorsys
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
import torch
from PIL import Image, ImageDraw

from polydet.core.config import ConfigError, SynthConfig
from polydet.data.formats import Annotation, write_dota
from polydet.data.quads import clip_quad, inside_share
from polydet.geometry import heading, polybox

SHAPES = ("card", "plate", "kite")
HEADING_BAND = (25, 22, 20)  # the dark band that marks the first (top) edge of cards and kites
# Sprite pixels per image pixel: a little supersampling keeps patterns crisp after warping.
SPRITE_SCALE = 1.25
MAX_OVERLAP = 0.15  # share of the smaller of two objects they may share
VISIBLE_RANGE = (0.55, 0.92)  # visible share of a truncated object
PLACEMENT_TRIES = 30
PARALLEL_FROM = 64  # images: from this many on, generate draws them in worker processes


@dataclass(frozen=True)
class SynthObject:
    """One drawn object."""

    cls: str
    corners: np.ndarray  # [4, 2] full quad in image pixels (may reach outside the image)
    label: np.ndarray  # [4, 2] labelled quad: the full quad, or its visible part if truncated
    truncated: bool


@dataclass(frozen=True)
class Rendered:
    """One synthetic image with what was drawn on it."""

    image: np.ndarray  # [H, W, 3] uint8
    objects: list[SynthObject]
    object_mask: np.ndarray  # [H, W] bool, pixels showing an object (after occlusion)


# --- colours and noise ----------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _muted(rng: np.random.Generator, v: tuple[float, float] = (0.25, 0.7)) -> tuple[int, int, int]:
    return _hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(*v))


def _noise(rng: np.random.Generator, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Smooth noise ``[H, W]`` in about [0, 1]: a random ``grid`` (w, h) upsampled bicubically."""
    cells = rng.random((grid[1], grid[0])).astype(np.float32)
    return np.asarray(Image.fromarray(cells, mode="F").resize(size, Image.Resampling.BICUBIC))


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Muted two-colour noise with a finer grey texture: ``[H, W, 3]`` float32 in 0..255."""
    c1, c2 = np.array(_muted(rng), np.float32), np.array(_muted(rng), np.float32)
    g = int(rng.integers(3, 8))
    f = _noise(rng, (g, g), (w, h))[..., None]
    fine = _noise(rng, (max(2, w // 6), max(2, h // 6)), (w, h))[..., None]
    amp = rng.uniform(15, 40)
    return c1 * (1 - f) + c2 * f + (fine - 0.5) * amp


# --- clutter --------------------------------------------------------------------------------


def _clutter(rng: np.random.Generator, img: Image.Image, density: float) -> None:
    """Distractors drawn in place: stains, irregular polygons, lines and small blobs."""
    w, h = img.size
    area = w * h / 256**2  # counts are per 256x256 pixels

    def count(lo: int, hi: int) -> int:
        return int(rng.poisson(density * area * rng.uniform(lo, hi)))

    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(count(1, 4)):  # soft stains: large, faint
        r = rng.uniform(15, 45)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        col = (0, 0, 0) if rng.random() < 0.6 else (255, 255, 255)
        draw.ellipse(
            [x - r, y - r * rng.uniform(0.5, 1), x + r, y + r],
            fill=(*col, int(rng.integers(25, 70))),
        )
    img.alpha_composite(layer)
    draw = ImageDraw.Draw(img)
    for _ in range(count(1, 4)):  # irregular 5-7-gons, muted
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, 18)
        k = int(rng.integers(5, 8))
        ang = np.sort(rng.uniform(0, 2 * math.pi, k))
        rad = r * rng.uniform(0.5, 1.0, k)
        pts = [
            (cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(ang.tolist(), rad.tolist())
        ]
        draw.polygon(pts, fill=_muted(rng, (0.2, 0.8)))
    for _ in range(count(3, 10)):  # lines and polylines
        n = int(rng.integers(2, 5))
        pts = [(float(rng.uniform(-10, w + 10)), float(rng.uniform(-10, h + 10)))]
        for _ in range(n - 1):
            a, d = rng.uniform(0, 2 * math.pi), rng.uniform(20, 120)
            pts.append((pts[-1][0] + d * math.cos(a), pts[-1][1] + d * math.sin(a)))
        col = _muted(rng, (0.05, 0.35)) if rng.random() < 0.6 else _muted(rng, (0.6, 0.9))
        draw.line(pts, fill=col, width=int(rng.integers(1, 4)))
    for _ in range(count(6, 20)):  # small blobs, some saturated
        r = rng.uniform(1.5, 7)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        col = (
            _hsv(rng.random(), rng.uniform(0.5, 1), rng.uniform(0.5, 1))
            if rng.random() < 0.3
            else _muted(rng)
        )
        draw.ellipse([x - r, y - r * rng.uniform(0.4, 1), x + r, y + r], fill=col)


# --- object shapes and sprites --------------------------------------------------------------


def _local_shape(
    rng: np.random.Generator, cls: str, s: float, cfg: SynthConfig
) -> tuple[np.ndarray, float]:
    """Corners ``[4, 2]`` around the origin (before rotation) and the shape's jitter factor.
    Corner order matches the sprite's TL, TR, BR, BL."""
    if cls == "kite":
        k = rng.uniform(1.2, max(1.2, min(1.8, cfg.max_aspect)))
        length, width = math.sqrt(2 * k) * s, math.sqrt(2 / k) * s  # area s^2 like the others
        t = rng.uniform(0.25, 0.4) * length
        pts = np.array([[0, 0], [width / 2, t], [0, length], [-width / 2, t]], np.float64)
        return pts - pts.mean(0), 0.6
    if cls == "card":
        a, jitter = rng.uniform(1.3, max(1.3, min(1.8, cfg.max_aspect))), 1.0
    else:
        a, jitter = rng.uniform(min(2.2, cfg.max_aspect), cfg.max_aspect), 0.4
    w, h = s * math.sqrt(a), s / math.sqrt(a)
    return np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]]), jitter


def _convex_enough(c: np.ndarray) -> bool:
    """All four corners turn the same way with an angle sine above 0.25 (no slivers)."""
    e = np.roll(c, -1, axis=0) - c
    cross = e[:, 0] * np.roll(e, -1, axis=0)[:, 1] - e[:, 1] * np.roll(e, -1, axis=0)[:, 0]
    norms = np.linalg.norm(e, axis=1) * np.linalg.norm(np.roll(e, -1, axis=0), axis=1)
    sines = cross / np.maximum(norms, 1e-9)
    return bool((sines > 0.25).all() or (sines < -0.25).all())


def _shape(rng: np.random.Generator, cls: str, cfg: SynthConfig, short_side: int) -> np.ndarray:
    """A random object quad ``[4, 2]`` around the origin: size, rotation, corner jitter."""
    lo, hi = cfg.scale_range
    s = math.exp(rng.uniform(math.log(lo), math.log(hi))) * short_side
    base, jitter = _local_shape(rng, cls, s, cfg)
    theta = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    base = base @ rot.T
    for _ in range(10):
        c = base + rng.normal(0, cfg.perspective * jitter * 0.09 * s, (4, 2))
        if _convex_enough(c):
            return c
    return base


def _seven_segment(
    draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], mask: int, width: float
) -> None:
    """Draw the segments of ``mask`` (bits a..g) of a seven-segment glyph in ``box``."""
    x0, y0, x1, y1 = box
    ym = (y0 + y1) / 2
    segs = [
        ((x0, y0), (x1, y0)), ((x1, y0), (x1, ym)), ((x1, ym), (x1, y1)), ((x0, y1), (x1, y1)),
        ((x0, ym), (x0, y1)), ((x0, y0), (x0, ym)), ((x0, ym), (x1, ym)),
    ]  # fmt: skip
    for bit, seg in enumerate(segs):
        if mask >> bit & 1:
            draw.line(seg, fill=(20, 20, 20, 255), width=max(1, round(width)))


# Seven-segment masks of 0-9 and a few letters (A, C, E, F, H, L, P, U).
_GLYPHS = (
    0x3F,
    0x06,
    0x5B,
    0x4F,
    0x66,
    0x6D,
    0x7D,
    0x07,
    0x7F,
    0x6F,
    0x77,
    0x39,
    0x79,
    0x71,
    0x76,
    0x38,
    0x73,
    0x3E,
)


def _sprite(rng: np.random.Generator, cls: str, sw: int, sh: int) -> Image.Image:
    """The object's face as an RGBA image ``sw`` x ``sh`` (mapped onto the quad later)."""
    img = Image.new("RGBA", (sw, sh), (0, 0, 0, 255))
    d = ImageDraw.Draw(img)
    m = min(sw, sh)
    if cls == "card":
        d.rectangle(
            [0, 0, sw, sh], fill=_hsv(rng.random(), rng.uniform(0, 0.15), rng.uniform(0.9, 1.0))
        )
        hue = rng.random()
        b = max(2.0, 0.09 * m)
        d.rectangle(
            [0, 0, sw - 1, sh - 1],
            outline=_hsv(hue, rng.uniform(0.7, 1), rng.uniform(0.45, 0.8)),
            width=round(b),
        )
        r = 0.22 * sh
        cx, cy = 2 * b + r, sh / 2
        d.ellipse(
            [cx - r, cy - r, cx + r, cy + r], fill=_hsv(hue + rng.uniform(0.3, 0.7), 0.9, 0.85)
        )
        # The heading mark: a dark band along the top (first) edge, over the border.
        d.rectangle([0, 0, sw, round(0.16 * sh)], fill=HEADING_BAND)
        x0, x1 = cx + r + b, sw - 2 * b
        for k in range(3):
            y = sh * (0.3 + 0.2 * k)
            d.rectangle(
                [x0, y - 0.04 * sh, x0 + (x1 - x0) * rng.uniform(0.5, 1), y + 0.04 * sh],
                fill=(90, 90, 90),
            )
    elif cls == "plate":
        bg = _hsv(0.14, 0.85, 0.95) if rng.random() < 0.5 else (235, 235, 235)
        d.rectangle([0, 0, sw, sh], fill=bg)
        b = max(1.5, 0.07 * sh)
        d.rectangle([0, 0, sw - 1, sh - 1], outline=(15, 15, 15), width=round(b))
        n = int(rng.integers(5, 8))
        cw = (sw - 4 * b) / n
        for k in range(n):
            gx = 2 * b + k * cw
            glyph = int(_GLYPHS[int(rng.integers(len(_GLYPHS)))])
            _seven_segment(
                d, (gx + 0.2 * cw, 0.22 * sh, gx + 0.8 * cw, 0.78 * sh), glyph, 0.11 * sh
            )
    else:  # kite: panels TL-TR-C and BR-BL-C in one colour, the other two in another
        h1 = rng.random()
        a = _hsv(h1, rng.uniform(0.75, 1), rng.uniform(0.75, 1))
        bcol = _hsv(h1 + rng.uniform(0.3, 0.7), rng.uniform(0.75, 1), rng.uniform(0.75, 1))
        c = (sw / 2, sh / 2)
        tl, tr, br, bl = (0, 0), (sw, 0), (sw, sh), (0, sh)
        d.polygon([tl, tr, c], fill=a)
        d.polygon([br, bl, c], fill=a)
        d.polygon([tr, br, c], fill=bcol)
        d.polygon([bl, tl, c], fill=bcol)
        spar = max(1, round(0.035 * m))
        d.line([tl, br], fill=(30, 25, 20), width=spar)
        d.line([tr, bl], fill=(30, 25, 20), width=spar)
        d.rectangle([0, 0, sw - 1, sh - 1], outline=(30, 25, 20), width=spar)
        # The heading mark: a band along the edge from the tip (sprite top-left) clockwise.
        d.line([tl, tr], fill=HEADING_BAND, width=max(2, round(0.2 * m)))
    return img


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst [4, 2]`` to input ``src``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -x * u, -y * u])
        rows.append([0, 0, 0, x, y, 1, -x * v, -y * v])
        rhs += [u, v]
    return tuple(float(c) for c in np.linalg.solve(np.array(rows), np.array(rhs)))


def _draw_object(
    rng: np.random.Generator, img: Image.Image, mask: np.ndarray, cls: str, corners: np.ndarray
) -> None:
    """Warp a fresh sprite of ``cls`` onto ``corners`` (TL, TR, BR, BL of the sprite)."""
    w, h = img.size
    x0, y0 = (max(0, math.floor(v)) for v in corners.min(0))
    x1, y1 = (min(lim, math.ceil(v)) for v, lim in zip(corners.max(0), (w, h)))
    if x1 <= x0 or y1 <= y0:
        return
    e = np.linalg.norm(np.roll(corners, -1, axis=0) - corners, axis=1)  # TL-TR, TR-BR, BR-BL, BL-TL
    sw = max(4, math.ceil(SPRITE_SCALE * max(e[0], e[2])))
    sh = max(4, math.ceil(SPRITE_SCALE * max(e[1], e[3])))
    sprite = _sprite(rng, cls, sw, sh)
    shade = rng.uniform(0.75, 1.05)  # lighting
    rgb = np.asarray(sprite, np.float32)
    rgb[..., :3] *= shade
    sprite = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), mode="RGBA")
    src = np.array([[0, 0], [sw, 0], [sw, sh], [0, sh]], np.float64)
    coeffs = _perspective_coeffs(corners - (x0, y0), src)
    warped = sprite.transform(
        (x1 - x0, y1 - y0), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR
    )
    img.alpha_composite(warped, dest=(x0, y0))
    mask[y0:y1, x0:x1] |= np.asarray(warped)[..., 3] >= 128


def _occlude(
    rng: np.random.Generator, img: Image.Image, mask: np.ndarray, corners: np.ndarray
) -> None:
    """Cover part of an object with a muted blob centred on its boundary."""
    k = int(rng.integers(4))
    t = rng.uniform(0, 1)
    p = corners[k] + t * (corners[(k + 1) % 4] - corners[k])
    s = math.sqrt(abs(shapely.area(shapely.Polygon(corners))))
    r = rng.uniform(0.15, 0.3) * s
    box = [p[0] - r, p[1] - r * rng.uniform(0.6, 1), p[0] + r, p[1] + r]
    layer = Image.new("L", img.size, 0)
    ImageDraw.Draw(layer).ellipse(box, fill=255)
    cover = Image.new("RGBA", img.size, (*_muted(rng), 255))
    img.paste(cover, (0, 0), layer)
    mask &= np.asarray(layer) < 128


# --- images -----------------------------------------------------------------------------------


def _place(
    rng: np.random.Generator,
    shape: np.ndarray,
    w: int,
    h: int,
    truncate: bool,
    placed: list[shapely.Polygon],
) -> np.ndarray | None:
    """Translate ``shape`` into the image: inside (or, ``truncate``, crossing the border with
    a visible share in ``VISIBLE_RANGE``), overlapping earlier objects by at most
    ``MAX_OVERLAP``; ``None`` when no spot is found."""
    lo, hi = shape.min(0), shape.max(0)
    fits = (hi - lo < (w - 2, h - 2)).all()
    for _ in range(PLACEMENT_TRIES):
        if truncate or not fits:
            span = hi - lo
            c = rng.uniform(-0.5 * span, (w, h) + 0.5 * span)
            quad = shape + c
            share = float(inside_share(quad[None], (0, 0, w, h))[0])
            if not VISIBLE_RANGE[0] <= share <= VISIBLE_RANGE[1]:
                continue
        else:
            c = rng.uniform((1, 1) - lo, (w - 1, h - 1) - hi)
            quad = shape + c
        poly = shapely.Polygon(quad)
        if all(poly.intersection(q).area <= MAX_OVERLAP * min(poly.area, q.area) for q in placed):
            placed.append(poly)
            return quad
    return None


def render(cfg: SynthConfig, index: int) -> Rendered:
    """Image ``index`` of the dataset ``cfg`` describes (a function of ``(cfg, index)`` only)."""
    rng = np.random.default_rng([cfg.seed, index])
    w, h = cfg.image_width, cfg.image_height
    img = Image.fromarray(_background(rng, w, h).clip(0, 255).astype(np.uint8)).convert("RGBA")
    _clutter(rng, img, cfg.clutter)
    mask = np.zeros((h, w), bool)
    n = (
        0
        if rng.random() < cfg.empty_fraction
        else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    )
    placed: list[shapely.Polygon] = []
    objects = []
    for _ in range(n):
        cls = cfg.classes[int(rng.integers(len(cfg.classes)))]
        shape = _shape(rng, cls, cfg, min(w, h))
        truncate = bool(rng.random() < cfg.truncation)
        quad = _place(rng, shape, w, h, truncate, placed)
        if quad is None:
            continue
        _draw_object(rng, img, mask, cls, quad)
        if rng.random() < cfg.occlusion:
            _occlude(rng, img, mask, quad)
        inside = bool(((quad >= 0) & (quad <= (w, h))).all())
        label = quad if inside else clip_quad(quad, (0, 0, w, h))
        if label is None:  # pragma: no cover - _place guarantees a visible share >= 55%
            continue
        if not inside:  # the clipped part in hull order: start it at the first edge again
            label = _from_first_edge(quad, label)
        objects.append(SynthObject(cls, quad, label, not inside))
    arr = np.asarray(img.convert("RGB"), np.float32)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * rng.uniform(2, 6)  # sensor grain
    return Rendered(arr.clip(0, 255).astype(np.uint8), objects, mask)


def _from_first_edge(quad: np.ndarray, clipped: np.ndarray) -> np.ndarray:
    """``clipped [4, 2]`` (a part of ``quad [4, 2]``, listed clockwise from its first edge)
    listed clockwise from the edge that continues ``quad``'s first edge."""
    ring = polybox.canonicalize_corners(torch.from_numpy(np.asarray(clipped, np.float64)))
    first = heading.map_first_corner(
        torch.from_numpy(np.asarray(quad, np.float64)), ring, torch.tensor(0)
    )
    return heading.start_at_first(ring, first).numpy()


def _check(cfg: SynthConfig) -> None:
    unknown = [c for c in cfg.classes if c not in SHAPES]
    if unknown:
        raise ConfigError(
            f"data.classes: {unknown} not among the shapes synth can draw {list(SHAPES)} "
            "(synth draws data.classes: list only those shapes there to generate data)"
        )


def _write(cfg: SynthConfig, index: int, images: Path, labels: Path) -> str:
    """Render image ``index`` and write its PNG and DOTA label file; returns its name."""
    name = f"synth_{index:05d}"
    r = render(cfg, index)
    Image.fromarray(r.image).save(images / f"{name}.png", format="PNG", compress_level=6)
    anns = [
        Annotation(tuple(round(float(x), 2) for x in o.label.reshape(-1)), o.cls, False)
        for o in r.objects
    ]
    write_dota(labels / f"{name}.txt", anns, imagesource="polydet-synth", gsd="null")
    return name


def _write_range(cfg: SynthConfig, start: int, stop: int, images: Path, labels: Path) -> list[str]:
    """:func:`_write` of images ``start`` to ``stop - 1``, in a worker process."""
    torch.set_num_threads(1)
    return [_write(cfg, i, images, labels) for i in range(start, stop)]


def generate(cfg: SynthConfig, out: Path | None = None, workers: int | None = None) -> Path:
    """Write the synthetic dataset to ``out`` (default ``cfg.out``): ``images/*.png`` and
    ``labelTxt/*.txt`` (DOTA v1.5); stale ``synth_*`` files from a larger run are removed.

    Each image is a function of ``(cfg, index)`` only, so from :data:`PARALLEL_FROM` images on
    they are drawn by ``workers`` processes (default: one per core, at most 4; the files are
    the same byte for byte: ``tests/test_data_synth.py``); fewer are drawn here (a worker's
    start, with its imports, costs a few seconds)."""
    _check(cfg)
    out = Path(out if out is not None else cfg.out)
    images, labels = out / "images", out / "labelTxt"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    n = cfg.num_images
    if workers > 1 and n >= PARALLEL_FROM:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked child of a process that ran torch's thread pool can hang.
        context = multiprocessing.get_context("spawn")
        bounds = np.linspace(0, n, 4 * workers + 1).astype(int)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            jobs = [
                pool.submit(_write_range, cfg, int(a), int(b), images, labels)
                for a, b in zip(bounds[:-1], bounds[1:])
                if b > a
            ]
            names = {name for job in jobs for name in job.result()}
    else:
        names = {_write(cfg, i, images, labels) for i in range(n)}
    for d, ext in ((images, ".png"), (labels, ".txt")):
        for p in d.glob(f"synth_*{ext}"):
            if p.stem not in names:
                p.unlink()
    return out
