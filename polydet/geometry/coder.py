"""Encode polyboxes relative to reference boxes (anchors, proposals) and decode them back.

For a reference box ``(x1, y1, x2, y2)`` with size ``w, h`` and centre ``(cx, cy)``, and its
corners in the polybox canonical order of an axis-aligned rectangle (top-left, top-right,
bottom-right, bottom-left)::

    (adx, ady) = (-w/2, -h/2), (w/2, -h/2), (w/2, h/2), (-w/2, h/2)

a polybox ``(xc, yc, dx1, dy1, ..., dx4, dy4)`` is encoded as 10 terms, each times its
weight ``W[j]``::

    t_xc = W0 (xc - cx) / w          t_yc = W1 (yc - cy) / h
    t_dxi = W (dxi - adxi) / w        t_dyi = W (dyi - adyi) / h      (corner i)

so every target is 0 when the polybox is the reference box itself. With the default
weight 10, a corner term moves like torchvision's ``5 log(w / wa)`` for small size changes
(``10 (dx2 - w_a/2) / w_a = 5 (w / w_a - 1)`` for a centred box), so losses keep their
familiar scale. The 10 terms over-determine 8 degrees of freedom (the corners' mean is the
centre); the network learns that, and decoding uses all 10 as they are.

Corner assignment. Ground truths arrive in canonical order (first corner = min ``x + y``).
For an object near 45 degrees that first corner jumps between two neighbours as the angle
crosses the tie, so the canonical targets of nearly identical objects differ by a whole
cyclic shift: a discontinuity the regressor cannot fit. ``encode(..., best_match=True)``
(opt-in; the default keeps ``decode(encode(p)) == p`` term by term) therefore uses, among
the 4 cyclic rotations of the ground truth's corners (orientation kept), the one closest
to the reference box's corners (smallest sum of squared weighted corner terms; ties to the
canonical order), as quadrilateral detectors do (e.g. MMRotate's best-match assignment
for quadrilaterals). The target then changes continuously with the object except where
two rotations are equally far, where either is an equally good answer; decoding such
targets gives the ground truth's corners starting elsewhere (``polybox.canonicalize``
restores the canonical polybox). ``decode`` never re-sorts corners: the loss compares
term by term.
Decoded polyboxes are *raw*: corner ``i`` is ``(xc + dxi, yc + dyi)`` in the regressed
order, and ``(xc, yc)`` need not be the corner mean. ``polydet.ops`` measures raw polyboxes
correctly; call ``polydet.polybox.canonicalize`` before returning them to users.

Clamping. ``decode`` limits every unweighted term ``|t / W|`` to ``clamp`` (default
``log(1000 / 16)`` ~ 4.14, torchvision's ``bbox_xform_clip``), so a decoded centre or
corner lies at most ``clamp`` reference sizes from the reference box's: infinite or huge
deltas give finite boxes (NaN deltas stay NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Reference corners (top-left, top-right, bottom-right, bottom-left) in units of (w, h).
_REF_CORNERS = ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5))
DEFAULT_CLAMP = math.log(1000.0 / 16)


def _ref_geometry(ref_boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``cx, cy, w, h`` ``[N]`` of reference boxes ``[N, 4]`` (xyxy)."""
    x1, y1, x2, y2 = ref_boxes.unbind(-1)
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


class PolyBoxCoder:
    """Invertible encoding of polyboxes relative to axis-aligned reference boxes."""

    def __init__(
        self, weights: Sequence[float] = (10.0,) * 10, clamp: float = DEFAULT_CLAMP
    ) -> None:
        weights = tuple(float(w) for w in weights)
        if len(weights) != 10 or not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"PolyBoxCoder: expected 10 positive weights, got {weights}")
        if not (math.isfinite(clamp) and clamp > 0):
            raise ValueError(f"PolyBoxCoder: clamp must be positive and finite, got {clamp}")
        self.weights = weights
        self.clamp = float(clamp)

    def _check_ref(self, ref_boxes: Tensor, n: int, what: str) -> None:
        if ref_boxes.dim() != 2 or ref_boxes.shape != (n, 4):
            raise ValueError(
                f"ref_boxes: expected shape [{n}, 4] to match {what}, got {tuple(ref_boxes.shape)}"
            )
        if n and not bool(
            ((ref_boxes[:, 2] > ref_boxes[:, 0]) & (ref_boxes[:, 3] > ref_boxes[:, 1])).all()
        ):
            raise ValueError("ref_boxes: every reference box needs a positive width and height")

    def _scales(self, ref_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Per-term offsets ``[N, 10]`` (what a term is relative to) and sizes ``[N, 10]``
        (what it is divided by), in pixels."""
        cx, cy, w, h = _ref_geometry(ref_boxes)
        unit = ref_boxes.new_tensor(_REF_CORNERS).flatten()  # [8]
        size = torch.stack([w, h] * 5, dim=-1)  # [N, 10]
        offset = torch.cat([torch.stack([cx, cy], -1), unit * size[:, 2:]], dim=-1)
        return offset, size

    def match_corners(self, polyboxes: Tensor, ref_boxes: Tensor) -> Tensor:
        """Polyboxes ``[N, 10]`` with corners cyclically rotated to best match
        ``ref_boxes [N, 4]`` (module docstring); same corners, same orientation."""
        self._check_ref(ref_boxes, polyboxes.shape[0], "polyboxes")
        corners = polyboxes[:, 2:].unflatten(-1, (4, 2))  # [N, 4, 2]
        rotations = torch.stack([corners.roll(-r, dims=1) for r in range(4)], 1)  # [N, 4, 4, 2]
        offset, size = self._scales(ref_boxes)
        w = polyboxes.new_tensor(self.weights[2:])
        terms = (rotations.flatten(2) - offset[:, None, 2:]) / size[:, None, 2:] * w  # [N, 4, 8]
        best = terms.square().sum(-1).argmin(-1)  # [N]; argmin keeps the first on ties
        chosen = rotations[torch.arange(len(best), device=best.device), best]  # [N, 4, 2]
        return torch.cat([polyboxes[:, :2], chosen.flatten(1)], dim=-1)

    def encode_rolls(self, polyboxes: Tensor, ref_boxes: Tensor, check: bool = True) -> Tensor:
        """Targets ``[N, 4, 10]`` of the 4 cyclic rolls of each polybox's corners (roll ``r``
        starts at corner ``r``; orientation kept): the same object written 4 ways, for a loss
        that does not depend on which corner comes first (:func:`order_free_loss`)."""
        if polyboxes.dim() != 2 or polyboxes.shape[-1] != 10:
            raise ValueError(f"polyboxes: expected shape [N, 10], got {tuple(polyboxes.shape)}")
        if check:
            self._check_ref(ref_boxes, polyboxes.shape[0], "polyboxes")
        corners = polyboxes[:, 2:].unflatten(-1, (4, 2))  # [N, 4, 2]
        rolls = torch.stack([corners.roll(-r, dims=1).flatten(1) for r in range(4)], 1)
        rolled = torch.cat([polyboxes[:, None, :2].expand(-1, 4, -1), rolls], dim=-1)
        offset, size = self._scales(ref_boxes.to(polyboxes.dtype))
        return (rolled - offset[:, None]) / size[:, None] * polyboxes.new_tensor(self.weights)

    def encode(self, polyboxes: Tensor, ref_boxes: Tensor, best_match: bool = False) -> Tensor:
        """Regression targets ``[N, 10]`` of polyboxes ``[N, 10]`` relative to ``ref_boxes
        [N, 4]`` (xyxy, pixels); with ``best_match`` corners are first rotated to the
        reference (module docstring)."""
        if polyboxes.dim() != 2 or polyboxes.shape[-1] != 10:
            raise ValueError(f"polyboxes: expected shape [N, 10], got {tuple(polyboxes.shape)}")
        if best_match:
            polyboxes = self.match_corners(polyboxes, ref_boxes)
        else:
            self._check_ref(ref_boxes, polyboxes.shape[0], "polyboxes")
        offset, size = self._scales(ref_boxes.to(polyboxes.dtype))
        return (polyboxes - offset) / size * polyboxes.new_tensor(self.weights)

    def decode(self, deltas: Tensor, ref_boxes: Tensor, check: bool = True) -> Tensor:
        """Polyboxes (raw, pixels) from ``deltas [N, 10]`` or ``[N, K * 10]`` (K classes)
        relative to ``ref_boxes [N, 4]``; the result has the shape of ``deltas``.
        ``check=False`` skips the reference-box check, whose ``bool`` reads the device (a
        host sync on CUDA): for callers whose boxes have positive sizes by construction."""
        if deltas.dim() != 2 or deltas.shape[-1] % 10 != 0:
            raise ValueError(f"deltas: expected shape [N, K * 10], got {tuple(deltas.shape)}")
        if check:
            self._check_ref(ref_boxes, deltas.shape[0], "deltas")
        dtype = torch.promote_types(deltas.dtype, ref_boxes.dtype)
        offset, size = self._scales(ref_boxes.to(dtype))
        d = deltas.to(dtype).unflatten(-1, (-1, 10)) / deltas.new_tensor(self.weights, dtype=dtype)
        d = d.clamp(-self.clamp, self.clamp)  # [N, K, 10]
        return (offset[:, None] + d * size[:, None]).flatten(1)


def order_free_loss(
    deltas: Tensor, polyboxes: Tensor, ref_boxes: Tensor, coder: PolyBoxCoder, beta: float
) -> tuple[Tensor, Tensor]:
    """Smooth-L1 of predicted ``deltas [N, 10]`` against the closest of the 4 corner rolls of
    the ground truths ``polyboxes [N, 10]`` (relative to ``ref_boxes [N, 4]``, positive sizes).

    The canonical corner order switches as a quad turns through ~45 degrees, so the canonical
    targets of two nearly identical objects differ by a whole cyclic shift; a regressor fed
    both learns their average, the edge-midpoint rhombus (IoU 0.5 with the object). Taking the
    minimum over the 4 rolls (the permutation-invariant loss of quadrilateral detectors) makes
    the loss a function of the corner *set*: continuous in the object's angle and the same
    whichever corner the ground truth starts at. Decoded outputs are re-canonicalised anyway.

    Returns the summed loss (a scalar, 0 for ``N == 0``) and the targets of the chosen rolls
    ``[N, 10]`` (for reports); :func:`polybox_loss` is what the model calls.
    """
    targets = coder.encode_rolls(polyboxes, ref_boxes, check=False)  # [N, 4, 10]
    per_roll = F.smooth_l1_loss(
        deltas[:, None].expand_as(targets), targets, beta=beta, reduction="none"
    ).sum(-1)  # [N, 4]
    best = per_roll.argmin(dim=1)  # ties: the lowest roll, i.e. the canonical order first
    chosen = per_roll.gather(1, best[:, None]).squeeze(1)
    rows = torch.arange(len(best), device=best.device)
    return chosen.sum(), targets[rows, best]


def polybox_loss(
    deltas: Tensor, gt: Tensor, refs: Tensor, coder: PolyBoxCoder, order_free: bool
) -> tuple[Tensor, Tensor]:
    """Summed smooth-L1 (beta 1/9, torchvision's) of ``deltas [N, 10]`` against the encoded
    ground truths ``gt [N, 10]`` relative to ``refs [N, 4]``, and the targets used ``[N, 10]``:
    the closest corner roll (:func:`order_free_loss`) or the canonical order."""
    if order_free:
        return order_free_loss(deltas, gt, refs, coder, beta=1 / 9)
    targets = coder.encode(gt, refs)
    return F.smooth_l1_loss(deltas, targets, beta=1 / 9, reduction="sum"), targets
