"""Test-time augmentation: exact views of an image, their detections mapped back and fused.

A view is one exact transform of the image: a left-right or top-bottom mirror, a rotation by
``k`` quarter turns (the training augmentations of :mod:`polydet.data.augment`, which move
every pixel centre onto another), or the model's input size times ``s``; or a rotation by
any angle (``angles``, degrees counter-clockwise on screen) onto a canvas that holds the
whole image (bilinear, the rest filled with the image's mean colour), shown to the model at
the input size that keeps the objects' pixel size (torch runtime; an exported model's fixed
input size shrinks the canvas instead). The detector runs on every view; each view's
polyboxes go back to the image by the inverse polybox transform (:func:`polydet.polybox.hflip`,
``vflip``, ``rot90`` with ``4 - k``, the inverse rotation of an angle view; a scale view is
mapped back by the model itself), then the views are fused per class.

Why angle views: the box head pools an axis-aligned RoI (the quad's enclosing box), which for
an object near 45 degrees holds as much background as object, and its corners lie mid-edge
of the RoI; measured, far fewer such objects are fitted at IoU 0.75 than axis-aligned ones.
In a view turned by 45 degrees the same object is axis-aligned. With ``align_power`` the
weighted fusion trusts each view in proportion to how axis-aligned the object is *in that
view* (README, Performance):

- ``nms``: polygon NMS (:func:`polydet.ops.batched_nms`) over all views' detections;
- ``weighted``: each detection, by descending score, gathers the not yet gathered ones of
  its class overlapping it by more than ``iou_threshold``; the group's corners are first
  **aligned** to the leader's (the cyclic roll with the smallest summed squared corner
  distance: the canonical first corner of two views of one object can differ by a whole
  roll near 45 degrees, and averaging misaligned corners collapses a quad into a rhombus),
  then averaged with weights score x (a + 0.05)^``align_power``, where ``a`` is how
  axis-aligned the detection was in its own view (1 axis-aligned, 0 at 45 degrees:
  :func:`polydet.eval.metrics.orientation_offset` / 45; ``align_power`` 0: the score alone);
  the score is the group's mean score times ``min(n, V) / V`` (``V`` views, as weighted boxes
  fusion), so an object seen in one view only is demoted.

A model that predicts headings (``first_corner``, :mod:`polydet.geometry.heading`) keeps
them: each view's first edge is mapped back with its polybox (its midpoint through the same
inverse transform), ``nms`` keeps the survivor's, ``weighted`` takes the leader's first edge
onto the fused quad.

:func:`with_tta` wraps a model (``.predict(images)``) so that predict, evaluate and the
MLflow model take TTA by one call.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polydet.core.config import TTAConfig
from polydet.core.errors import ModelError
from polydet.data import augment
from polydet.eval.metrics import orientation_offset
from polydet.geometry import heading, polybox


def canvas_size(width: int, height: int, degrees: float) -> tuple[int, int]:
    """``(width, height)`` of the canvas that holds a ``width`` x ``height`` image turned by
    ``degrees``."""
    c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
    return math.ceil(width * c + height * s - 1e-6), math.ceil(width * s + height * c - 1e-6)


def _to_source(points: Tensor, degrees: float, source: tuple[int, int], canvas: tuple[int, int]):
    """Points ``[..., 2]`` of the canvas (pixel-edge convention) at their place in the source
    image: the inverse of turning the source by ``degrees`` counter-clockwise on screen about
    its centre onto the canvas's centre."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    qx, qy = points[..., 0] - canvas[0] / 2, points[..., 1] - canvas[1] / 2
    # Counter-clockwise on screen (y down) is clockwise in the maths frame: q = R(-t) p, so
    # p = R(t) q.
    return torch.stack([c * qx - s * qy + source[0] / 2, s * qx + c * qy + source[1] / 2], -1)


def rotate_image(image: Tensor, degrees: float) -> Tensor:
    """``image [3, H, W]`` turned by ``degrees`` counter-clockwise on screen onto the canvas
    of :func:`canvas_size` (bilinear; outside the image, its mean colour)."""
    height, width = image.shape[-2:]
    cw, ch = canvas_size(width, height, degrees)
    ys, xs = torch.meshgrid(
        torch.arange(ch, dtype=torch.float64) + 0.5,
        torch.arange(cw, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    p = _to_source(torch.stack([xs, ys], -1), degrees, (width, height), (cw, ch))
    grid = torch.stack([2 * p[..., 0] / width - 1, 2 * p[..., 1] / height - 1], -1)
    grid = grid[None].to(image.dtype)
    out = F.grid_sample(image[None], grid, align_corners=False)[0]
    inside = F.grid_sample(image.new_ones(1, 1, height, width), grid, align_corners=False)[0]
    return out + image.mean((1, 2), keepdim=True) * (1 - inside)


@dataclasses.dataclass(frozen=True)
class View:
    """One transform: ``flip`` (``""``, ``"h"`` or ``"v"``), then ``k`` quarter turns
    (``torch.rot90`` on H, W); ``scale`` multiplies the model's input size; ``angle`` turns
    the image by that many degrees onto a larger canvas (:func:`rotate_image`)."""

    flip: str = ""
    k: int = 0
    scale: float = 1.0
    angle: float = 0.0

    def apply(self, image: Tensor) -> Tensor:
        """The view of ``image [3, H, W]`` (``[3, W, H]`` for odd ``k``)."""
        if self.angle:
            return rotate_image(image, self.angle)
        target: augment.Target = {"polyboxes": image.new_zeros(0, 10)}
        if self.flip == "h":
            image, _ = augment.hflip(image, target)
        elif self.flip == "v":
            image, _ = augment.vflip(image, target)
        if self.k % 4:
            image, _ = augment.rot90(image, target, self.k)
        return image

    def invert(
        self, polyboxes: Tensor, width: int, height: int, source: tuple[int, int] | None = None
    ) -> Tensor:
        """Polyboxes ``[N, 10]`` found in the view (``width`` x ``height`` pixels) mapped back
        to the original image's pixels (canonical); an angle view needs the original's
        ``source = (width, height)``."""
        p = polyboxes.float()
        if self.angle:  # turned back (may reach past the image: clipped after the fusion)
            if source is None:
                raise ValueError("an angle view maps back to its source image: pass its size")
            ring = _to_source(polybox.to_corners(p), self.angle, source, (width, height))
            return polybox.from_corners(ring)
        if self.k % 4:
            p = polybox.rot90(p, width, height, 4 - self.k % 4)
            if self.k % 2:
                width, height = height, width
        if self.flip == "h":
            p = polybox.hflip(p, width)
        elif self.flip == "v":
            p = polybox.vflip(p, height)
        return p


def _alignment(polyboxes: Tensor) -> dict[str, Tensor]:
    """``{"align": [K]}``: how axis-aligned each of a view's polyboxes is in that view, 1
    axis-aligned to 0 at 45 degrees (:func:`~polydet.eval.metrics.orientation_offset` / 45)."""
    offset = orientation_offset(polyboxes.detach().cpu().double().numpy())
    return {"align": torch.from_numpy(offset / 45.0).float()}


def _first_corner_back(
    view: View, det: dict[str, Tensor], shown: Tensor, source: tuple[int, int]
) -> dict[str, Tensor]:
    """``{"first_corner": [K]}`` of a view's detections mapped back (empty without one): the
    first edge's midpoint goes through :meth:`View.invert` as a point (a polybox whose four
    corners coincide) and picks the nearest edge of the mapped-back quad."""
    if "first_corner" not in det:
        return {}
    boxes, first = det["polyboxes"].detach().cpu().float(), det["first_corner"].detach().cpu()
    mid = heading.first_edge_midpoint(polybox.to_corners(boxes), first)  # [K, 2]
    points = torch.cat([mid, mid.new_zeros(mid.shape[0], 8)], -1)
    back = view.invert(points, shown.shape[-1], shown.shape[-2], source)[:, :2]
    ring = polybox.to_corners(view.invert(boxes, shown.shape[-1], shown.shape[-2], source))
    k = heading.nearest_edge(ring, back)
    return {"first_corner": torch.where(first >= 0, k, torch.full_like(k, heading.UNKNOWN))}


def views_of(cfg: TTAConfig) -> list[View]:
    """The identity, then one view per flip, quarter turn, scale and angle of ``cfg``."""
    return [
        View(),
        *(View(flip=f) for f in cfg.flips),
        *(View(k=k) for k in cfg.rot90),
        *(View(scale=s) for s in cfg.scales),
        *(View(angle=a) for a in cfg.angles),
    ]


def _empty() -> dict[str, Tensor]:
    return {
        "polyboxes": torch.zeros(0, 10),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }


def fuse(
    dets: Sequence[dict[str, Tensor]],
    fusion: str,
    iou_threshold: float,
    num_views: int,
    align_power: float = 0.0,
) -> dict[str, Tensor]:
    """One image's detections from its views' (already in image pixels), per class; result
    sorted by descending score (module docstring: ``nms`` and ``weighted``). A view's
    ``"align" [K]`` (axis alignment in that view, 0 to 1) weighs its detections in the
    weighted fusion by ``(align + 0.05)^align_power``."""
    from polydet.geometry.ops import batched_nms, pairwise_iou

    if not dets:
        return _empty()
    b = torch.cat([d["polyboxes"].float().reshape(-1, 10) for d in dets])
    s = torch.cat([d["scores"].float().reshape(-1) for d in dets])
    lab = torch.cat([d["labels"].long().reshape(-1) for d in dets])
    if len(s) == 0:
        return _empty()
    weight = s
    if align_power > 0 and all("align" in d for d in dets):
        align = torch.cat([d["align"].float().reshape(-1) for d in dets])
        weight = s * (align + 0.05) ** align_power

    with_first = all("first_corner" in d for d in dets)
    if with_first:
        first = torch.cat([d["first_corner"].long().reshape(-1) for d in dets])
    if fusion == "nms":
        keep = batched_nms(b, s, lab, iou_threshold)
        keep = keep[s[keep].argsort(descending=True, stable=True)]
        out = {"polyboxes": b[keep], "scores": s[keep], "labels": lab[keep]}
        if with_first:
            out["first_corner"] = first[keep]
        return out
    if fusion != "weighted":
        raise ValueError(f"unknown fusion {fusion!r} (expected nms or weighted)")
    # [N, N]: overlap of same-class pairs only, so different classes never fuse.
    same = (pairwise_iou(b, b) > iou_threshold) & (lab[:, None] == lab[None, :])
    free = torch.ones(len(s), dtype=torch.bool)
    boxes, scores, labels, firsts = [], [], [], []
    corners = polybox.to_corners(b)  # [N, 4, 2]
    for i in s.argsort(descending=True, stable=True).tolist():
        if not free[i]:
            continue
        members = torch.nonzero(same[i] & free).flatten()
        members = torch.cat([members.new_tensor([i]), members[members != i]])
        free[members] = False
        w = weight[members]
        aligned = polybox.align_corners(corners[i], corners[members])  # [n, 4, 2]
        mean = (aligned * w[:, None, None]).sum(0) / w.sum()
        boxes.append(polybox.from_corners(mean))
        scores.append(s[members].mean() * min(len(members), num_views) / num_views)
        labels.append(lab[i])
        if with_first:  # the leader's first edge onto the fused quad
            mid = heading.first_edge_midpoint(corners[i], first[i])
            k = heading.nearest_edge(polybox.to_corners(boxes[-1]), mid)
            firsts.append(torch.where(first[i] >= 0, k, first[i]))
    out = {"polyboxes": torch.stack(boxes), "scores": torch.stack(scores)}
    out["labels"] = torch.stack(labels)
    if with_first:
        out["first_corner"] = torch.stack(firsts)
    order = out["scores"].argsort(descending=True, stable=True)
    return {k: v[order] for k, v in out.items()}


@contextmanager
def input_scale(net: Any, scale: float) -> Iterator[None]:
    """Within the block, ``net`` (a :class:`~polydet.model.PolyDetector`) resizes its inputs
    to ``scale`` times ``model.min_size`` / ``max_size``; its own exact rescaling maps the
    detections back to the input's pixels."""
    if scale == 1.0:
        yield
        return
    old = net.cfg
    net.cfg = dataclasses.replace(
        old, min_size=round(old.min_size * scale), max_size=round(old.max_size * scale)
    )
    try:
        yield
    finally:
        net.cfg = old


class TTAModel:
    """``net`` with :meth:`predict` over every view of ``cfg``, fused; other attributes
    (``cfg``, ``classes``, ``eval``) are ``net``'s."""

    def __init__(self, net: Any, cfg: TTAConfig) -> None:
        self.net, self.tta, self.views = net, cfg, views_of(cfg)
        if cfg.scales and not self._scalable():
            raise ModelError(
                "evaluate.tta.scales needs the torch runtime (an exported model has its input "
                "size fixed); set evaluate.tta.scales=[]"
            )
        if cfg.angles and not self._scalable():
            # An exported model's fixed input size would shrink the larger canvas and its
            # objects: the angle views are left out there (README, test-time augmentation).
            self.views = [v for v in self.views if not v.angle]
            warnings.warn(
                "evaluate.tta.angles needs the torch runtime (an exported model has its input "
                "size fixed): this runtime uses the other views only",
                stacklevel=2,
            )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.net, name)

    def _scalable(self) -> bool:
        """The torch runtime: its input size can change per call (:func:`input_scale`)."""
        return hasattr(self.net, "_resize") and dataclasses.is_dataclass(self.net.cfg)

    def _keep_size(self, image: Tensor, canvas: Tensor) -> float:
        """The input-size factor at which the model sees ``canvas`` at ``image``'s resize
        factor (so an angle view's objects keep their pixel size); 1 for an exported model."""
        if not self._scalable():
            return 1.0
        return self.net.resize_factor(*image.shape[-2:]) / self.net.resize_factor(
            *canvas.shape[-2:]
        )

    def view_detections(self, images: Sequence[Tensor]) -> list[list[dict[str, Tensor]]]:
        """Per view, per image: the view's detections mapped back to the image's pixels
        (CPU tensors), with ``align``: how axis-aligned each was in its view (0 to 1)."""
        out = []
        for view in self.views:
            shown = [view.apply(im) for im in images]
            if view.angle:  # one image at a time, each at the size that keeps its objects'
                found = []
                for im, v in zip(images, shown):
                    with input_scale(self.net, self._keep_size(im, v)):
                        found += self.net.predict([v])
            else:
                with input_scale(self.net, view.scale):
                    found = self.net.predict(shown)
            out.append(
                [
                    {
                        "polyboxes": view.invert(
                            d["polyboxes"].detach().cpu(),
                            v.shape[-1],
                            v.shape[-2],
                            (im.shape[-1], im.shape[-2]),
                        ),
                        "scores": d["scores"].detach().float().cpu(),
                        "labels": d["labels"].detach().cpu(),
                        **(_alignment(d["polyboxes"]) if self.tta.align_power > 0 else {}),
                        **_first_corner_back(view, d, v, (im.shape[-1], im.shape[-2])),
                    }
                    for d, v, im in zip(found, shown, images)
                ]
            )
        return out

    def predict(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Per image ``{"polyboxes", "scores", "labels"}`` fused over the views (and
        ``first_corner`` with its ``heading`` when the model predicts one, as it does)."""
        per_view = self.view_detections(images)
        fused = [
            fuse(
                [v[i] for v in per_view],
                self.tta.fusion,
                self.tta.iou_threshold,
                len(per_view),
                self.tta.align_power,
            )
            for i in range(len(images))
        ]
        for det, image in zip(fused, images):
            if any(v.angle for v in self.views):
                det.update(_clipped(det, image.shape[-1], image.shape[-2]))
            if "first_corner" in det:
                det["heading"] = heading.heading_degrees(det["polyboxes"], det["first_corner"])
        return fused


def _clipped(det: dict[str, Tensor], width: int, height: int) -> dict[str, Tensor]:
    """``polyboxes`` (and ``first_corner``) of fused detections clipped to the image: an
    angle view's canvas reaches past it. A quad that crosses the border becomes the quad of
    its part inside (:func:`polydet.data.quads.clip_quad`, as ``prepare`` clips such labels;
    clamping its corners instead measured 0.01-0.02 lower AP75). The first corner follows its
    edge (nearest to the old first edge's midpoint)."""
    from polydet.data.quads import clip_quad

    ring = polybox.to_corners(det["polyboxes"])
    clipped = torch.stack([ring[..., 0].clamp(0, width), ring[..., 1].clamp(0, height)], -1)
    crossing = (clipped != ring).any(-1).any(-1) & torch.isfinite(ring).all(-1).all(-1)
    for i in torch.nonzero(crossing).flatten().tolist():  # (non-finite rows: dropped later)
        # The part inside the image, reduced to a quad, as `polydet prepare` clips labels.
        inside = clip_quad(ring[i].double().numpy(), (0.0, 0.0, float(width), float(height)))
        if inside is not None:
            clipped[i] = torch.from_numpy(inside).to(clipped.dtype)
    out = {"polyboxes": polybox.from_corners(clipped)}
    if "first_corner" in det:
        first = det["first_corner"]
        mid = heading.first_edge_midpoint(ring, first.clamp_min(0))
        k = heading.nearest_edge(polybox.to_corners(out["polyboxes"]), mid)
        out["first_corner"] = torch.where(first >= 0, k, first)
    return out


def with_tta(net: Any, cfg: TTAConfig) -> Any:
    """``net`` itself when ``cfg.enabled`` is false or no view but the identity is left (an
    exported model without the angle views), else :class:`TTAModel` over it."""
    if not cfg.enabled:
        return net
    tta = TTAModel(net, cfg)
    return net if len(tta.views) == 1 else tta
