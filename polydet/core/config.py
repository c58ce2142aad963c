"""Typed, strict, frozen configuration loaded from ``params.yaml``.

One frozen dataclass per pipeline stage (``cfg.data``, ``cfg.synth``, ``cfg.anchors``,
``cfg.model``, ``cfg.train``, ``cfg.evaluate``, ``cfg.debug``, ``cfg.tracking``). Every key
is required and no unknown key is accepted: an error names the dotted key and the file.
Lists become tuples (frozen all the way down). ``overrides`` (``"train.lr=0.01"``, the value
parsed as YAML) serve the command line and the tests; nothing happens at import time.

Each fact is set in one place of ``params.yaml``; the sections that also need it get a copy at
load time (:data:`DERIVED`): ``cfg.model.num_classes`` is ``1 + len(data.classes)``,
``cfg.model.anchor_sizes`` / ``aspect_ratios`` are ``anchors.sizes`` / ``aspect_ratios``, and
``cfg.synth.classes`` is ``data.classes``. The model section keeps those fields because a model
file carries its model section alone (:func:`model_config_from_dict`). A params file that
still sets a copied key is an error saying what to change (``model.num_classes`` is accepted
when it agrees).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from polydet.core.errors import PolydetError


class ConfigError(PolydetError, ValueError):
    """A configuration file or override that does not fit the schema.

    ``key``: the dotted key at fault when the file has it (:func:`load_config` adds its line).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def check_ranges(section: str, obj: Any, checks: dict[str, bool], meaning: str = "") -> None:
    """Raise a :class:`ConfigError` naming ``section.key`` for the first failed check."""
    for key, ok in checks.items():
        if not ok:
            value = getattr(obj, key)
            raise ConfigError(f"{section}.{key}: value {value!r} is out of range{meaning}")


def _share(x: float) -> bool:
    return 0.0 <= x <= 1.0


@dataclass(frozen=True)
class SplitConfig:
    train: float
    val: float
    test: float
    seed: int

    def __post_init__(self) -> None:
        shares = {k: _share(getattr(self, k)) for k in ("train", "val", "test")}
        check_ranges("data.split", self, {**shares, "seed": self.seed >= 0})


@dataclass(frozen=True)
class TileConfig:
    enabled: bool
    size: int  # tile side in pixels
    overlap: int  # pixels shared by neighbouring tiles
    min_visible: float  # keep an object cut by a tile edge if this share of its area is inside
    # Image scales the tiles are cut at (DOTA's multi-scale split: 0.5, 1.0, 1.5): at scale r a
    # tile covers size/r source pixels (overlap/r shared) and is resized by r (tiling.tile_plan).
    scales: tuple[float, ...]


@dataclass(frozen=True)
class DataConfig:
    format: Literal["dota", "yolo_obb", "coco", "icdar15"]
    root: str  # raw dataset, tracked by data.dvc
    classes: tuple[str, ...]  # label i+1 is classes[i]; 0 is background
    on_error: Literal["stop", "skip"]  # policy for bad records on import
    min_inside: float  # share of a quad's area inside the image to keep it (clipped) at all
    split: SplitConfig
    tile: TileConfig
    out: str  # prepared dataset directory
    # Classes whose first corner means nothing (no heading loss, no heading metric).
    symmetric_classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"data.classes: expected distinct names, got {list(self.classes)}")
        if not set(self.symmetric_classes) <= set(self.classes):
            extra = sorted(set(self.symmetric_classes) - set(self.classes))
            raise ConfigError(f"data.symmetric_classes: {extra} not in data.classes")
        if not 0.0 < self.min_inside <= 1.0:
            raise ConfigError(f"data.min_inside: expected a share in (0, 1], got {self.min_inside}")
        t = self.tile
        if t.size < 1 or not 0 <= t.overlap < t.size or not 0.0 < t.min_visible <= 1.0:
            raise ConfigError(
                "data.tile: expected size >= 1, 0 <= overlap < size and min_visible in (0, 1]"
            )
        if not t.scales or len(set(t.scales)) != len(t.scales) or min(t.scales) <= 0:
            raise ConfigError(
                f"data.tile.scales: expected distinct scales > 0, got {list(t.scales)}"
            )


@dataclass(frozen=True)
class SynthConfig:
    out: str
    num_images: int
    image_width: int
    image_height: int
    min_objects: int
    max_objects: int
    empty_fraction: float  # share of images with no object at all
    scale_range: tuple[float, float]  # object size as a share of the image's shorter side
    max_aspect: float
    perspective: float  # 0 = parallelograms only, 1 = strong perspective warps
    occlusion: float  # probability that a clutter patch is drawn over an object
    truncation: float  # probability that an object is allowed to cross the border
    clutter: float  # density of distractors (lines, blobs, stains); 0 = textured background only
    classes: tuple[str, ...]  # = data.classes (DERIVED); each one of polydet.data.synth.SHAPES
    seed: int

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        checks = {
            "num_images": self.num_images >= 0,
            "image_width": self.image_width >= 16,
            "image_height": self.image_height >= 16,
            "min_objects": 0 <= self.min_objects <= self.max_objects,
            "empty_fraction": 0.0 <= self.empty_fraction <= 1.0,
            "scale_range": 0.0 < lo <= hi <= 1.0,
            "max_aspect": self.max_aspect >= 1.0,
            "perspective": 0.0 <= self.perspective <= 1.0,
            "occlusion": 0.0 <= self.occlusion <= 1.0,
            "truncation": 0.0 <= self.truncation <= 1.0,
            "clutter": self.clutter >= 0.0,
            "classes": len(self.classes) > 0 and len(set(self.classes)) == len(self.classes),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"synth.{key}: value {getattr(self, key)!r} is out of range")


@dataclass(frozen=True)
class AnchorsConfig:
    fit: bool  # fit sizes/ratios to the data (else use the values below as they are)
    # The one place for the configured anchors: the fit's starting point and the set it must
    # beat, and the model's anchors when there is no anchors.json (model.anchor_sizes / ratios).
    sizes: tuple[tuple[int, ...], ...]  # per FPN level, model input pixels
    aspect_ratios: tuple[float, ...]  # h / w, shared by all levels
    num_ratios: int  # how many ratios the fit chooses
    # A chosen fit's sizes are multiplied by this; auto: the factor (1-2) that gives the most
    # objects an anchor above model.rpn.fg_iou_thresh on the real anchor grid.
    size_factor: float | Literal["auto"]
    out: str

    def __post_init__(self) -> None:
        checks = {
            "sizes": bool(self.sizes) and all(s > 0 for lv in self.sizes for s in lv),
            "aspect_ratios": bool(self.aspect_ratios) and all(r > 0 for r in self.aspect_ratios),
            "num_ratios": self.num_ratios >= 1,
            "size_factor": self.size_factor == "auto" or self.size_factor > 0,
        }
        check_ranges("anchors", self, checks)


@dataclass(frozen=True)
class RPNConfig:
    pre_nms_top_n_train: int  # per FPN level, before NMS
    post_nms_top_n_train: int  # per image, after NMS
    pre_nms_top_n_test: int
    post_nms_top_n_test: int
    nms_thresh: float  # box IoU of proposal hulls
    fg_iou_thresh: float  # anchor vs ground-truth hull IoU for a positive
    bg_iou_thresh: float  # below this an anchor is a negative
    batch_size_per_image: int  # sampled anchors per image for the losses
    positive_fraction: float
    score_thresh: float  # objectness probability a proposal needs
    # 10 per-term weights of PolyBoxCoder; (1, 1, 2, ..., 2) matches torchvision's RPN (1, 1, 1, 1)
    # because a corner term is about -weight/2 * log(size ratio).
    coder_weights: tuple[float, ...]
    order_free: bool  # polybox loss against the closest cyclic roll of the corners (coder.py)
    loss_weight: float  # multiplies loss_rpn_polybox

    def __post_init__(self) -> None:
        check_ranges("model.rpn", self, _head_checks(self))


@dataclass(frozen=True)
class RoIConfig:
    pool_size: int  # MultiScaleRoIAlign output side (torchvision: 7)
    sampling_ratio: int  # RoIAlign samples per bin side (torchvision: 2; 1 is ~3x cheaper on CPU)
    representation_size: int  # width of the TwoMLPHead
    batch_size_per_image: int  # sampled proposals per image for the losses
    positive_fraction: float
    fg_iou_thresh: float  # proposal vs ground-truth hull IoU for a positive
    bg_iou_thresh: float
    score_thresh: float  # class probability a detection needs
    nms_thresh: float  # polygon IoU, per class
    detections_per_img: int
    # 10 per-term weights of PolyBoxCoder; all 10 match torchvision's box head (10, 10, 5, 5).
    coder_weights: tuple[float, ...]
    order_free: bool  # polybox loss against the closest cyclic roll of the corners (coder.py)
    loss_weight: float  # multiplies loss_polybox
    iou_loss_weight: float  # multiplies loss_polybox_iou, 1 - polygon IoU of the decoded positives
    # The second stage: "quad" pools each first-stage quad on a grid laid on the quad itself
    # and regresses its corners in the quad's frame (polydet/model/quad_head.py); "hull"
    # runs the box head again on the quads' axis-aligned hulls (the earlier design)
    second_stage: Literal["quad", "hull"]
    refine_steps: int  # inference: passes of the second stage over the first stage's quads
    # inference: refine the best N (RoI, class) candidates before NMS (0: refine the NMS
    # survivors after it)
    refine_candidates: int
    # inference, with refine_candidates: box voting among the refined quads overlapping a kept
    # one by this IoU; 0 = off
    vote_iou: float
    refine_loss_weight: float  # training: the box losses again on the positives' refined hulls
    heading_loss_weight: float  # first-corner (heading) cross-entropy; 0 = no heading head
    # training: binary cross-entropy of a localisation-quality branch (the IoU of each decoded
    # positive with its ground truth); 0 = no branch
    quality_loss_weight: float
    # inference, with the branch: score = class probability^(1 - p) x predicted IoU^p
    quality_power: float

    def __post_init__(self) -> None:
        checks = {
            "pool_size": self.pool_size >= 1,
            "representation_size": self.representation_size >= 1,
            "detections_per_img": self.detections_per_img >= 1,
            "refine_steps": self.refine_steps >= 0,
            "second_stage": self.second_stage in ("quad", "hull"),
            "refine_candidates": self.refine_candidates >= 0,
            "vote_iou": 0.0 <= self.vote_iou <= 1.0,
            "refine_loss_weight": self.refine_loss_weight >= 0,
            "heading_loss_weight": self.heading_loss_weight >= 0,
            "quality_loss_weight": self.quality_loss_weight >= 0,
            "quality_power": 0.0 <= self.quality_power <= 1.0,
            **_head_checks(self),
        }
        check_ranges("model.roi", self, checks)


def _head_checks(c: RPNConfig | RoIConfig) -> dict[str, bool]:
    """The ranges RPN and RoI heads share: counts >= 1, IoUs and shares in [0, 1]."""
    checks = {
        "batch_size_per_image": c.batch_size_per_image >= 1,
        "positive_fraction": 0.0 < c.positive_fraction <= 1.0,
        "fg_iou_thresh": 0.0 < c.fg_iou_thresh <= 1.0,
        "bg_iou_thresh": 0.0 <= c.bg_iou_thresh <= c.fg_iou_thresh,
        "score_thresh": 0.0 <= c.score_thresh < 1.0,
        "nms_thresh": 0.0 < c.nms_thresh <= 1.0,
        "coder_weights": all(w > 0 for w in c.coder_weights),
    }
    if isinstance(c, RPNConfig):
        for key in (
            "pre_nms_top_n_train", "post_nms_top_n_train", "pre_nms_top_n_test",
            "post_nms_top_n_test",
        ):  # fmt: skip
            checks[key] = getattr(c, key) >= 1
    return checks


@dataclass(frozen=True)
class ModelConfig:
    backbone: Literal["resnet18_fpn", "resnet50_fpn", "mobilenet_v3_fpn"]
    weights: str | None  # None = from scratch; a torchvision weights name or a file path
    trainable_layers: int  # backbone stages left trainable with pretrained weights (0-5)
    # Backbone stages feeding the FPN (ResNet layer k / MobileNetV3 stage k: stride 2**(k+1));
    # the FPN adds one max-pooled level, so anchor_sizes needs len(returned_layers) + 1 levels.
    returned_layers: tuple[int, ...]
    fpn_channels: int
    # Also pool RoIs from ResNet layer 1 (stride 4) through the FPN; the RPN does not see it.
    fine_roi_level: bool
    # From params.yaml these three are DERIVED (1 + len(data.classes); anchors.sizes and
    # anchors.aspect_ratios); a model file states them, so that it rebuilds on its own.
    num_classes: int  # including background
    min_size: int
    max_size: int
    anchor_sizes: tuple[tuple[int, ...], ...]  # used when no anchors file is given
    aspect_ratios: tuple[float, ...]
    rpn: RPNConfig
    roi: RoIConfig


def check_model_config(model: ModelConfig) -> None:
    """Range and cross-field checks of the model section; a :class:`ConfigError` names the
    key."""
    checks = {
        # trainable_layers and returned_layers depend on the backbone: checked when built.
        "fpn_channels": model.fpn_channels >= 1,
        "num_classes": model.num_classes >= 2,
        "min_size": model.min_size >= 1,
        "max_size": model.max_size >= model.min_size,
        "anchor_sizes": all(s > 0 for level in model.anchor_sizes for s in level),
        "aspect_ratios": bool(model.aspect_ratios) and all(r > 0 for r in model.aspect_ratios),
    }
    check_ranges("model", model, checks)
    for name, weights in (("rpn", model.rpn.coder_weights), ("roi", model.roi.coder_weights)):
        if len(weights) != 10:
            raise ConfigError(f"model.{name}.coder_weights: expected 10 weights, one per term")
    levels = len(model.returned_layers) + 1
    if len(model.anchor_sizes) != levels:
        raise ConfigError(
            f"model.anchor_sizes: {len(model.anchor_sizes)} levels, but returned_layers "
            f"{list(model.returned_layers)} + the pooled level give {levels} FPN levels"
        )


def model_config_from_dict(raw: dict) -> ModelConfig:
    """A :class:`ModelConfig` from a plain mapping (e.g. the ``model`` entry of a model file).

    Model files written before the loss keys existed were trained with the canonical-order
    loss at weight 1; those keys are filled in so that such files keep loading."""
    raw = {"fine_roi_level": False, **raw}
    for stage in ("rpn", "roi"):
        if isinstance(raw.get(stage), dict):
            raw[stage] = {"order_free": False, "loss_weight": 1.0, **raw[stage]}
    if isinstance(raw.get("roi"), dict):
        raw["roi"] = {
            "sampling_ratio": 2,
            "iou_loss_weight": 0.0,
            "refine_steps": 0,
            "refine_loss_weight": 0.0,
            "refine_candidates": 0,
            "vote_iou": 0.0,
            "quality_loss_weight": 0.0,
            "quality_power": 0.0,
            "second_stage": "hull",
            **raw["roi"],
        }
        # Model files from before the heading head have no heading weights: heading off.
        raw["roi"] = {"heading_loss_weight": 0.0, **raw["roi"]}
    model = _build(ModelConfig, raw, "model")
    check_model_config(model)
    return model


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float  # probability of a left-right flip
    vflip: float  # probability of a top-bottom flip
    rot90: float  # probability of a rotation by a random multiple of 90 degrees (k = 1..3)
    color_jitter: float  # strength: brightness/contrast/saturation factors in [1 - s, 1 + s]

    def __post_init__(self) -> None:
        for key in ("hflip", "vflip", "rot90"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"train.augment.{key}: expected a probability in [0, 1]")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ConfigError("train.augment.color_jitter: expected a strength in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    device: str  # "auto", "cpu", "cuda", "cuda:1"
    amp: bool  # mixed precision: float16 on CUDA, bfloat16 on CPUs with fast bf16 (AVX-512/AMX)
    epochs: int
    max_steps: int  # 0 = no cap
    batch_size: int
    num_workers: int  # data-loading processes; -1 = auto (up to 4 per GPU on CUDA, 0 on CPU)
    optimizer: Literal["sgd", "adamw"]
    lr: float
    momentum: float
    weight_decay: float
    decay_norm_and_bias: bool  # weight decay on norm parameters and biases too (usual: false)
    lr_scaling: Literal["linear", "none"]  # linear: lr x number of processes (DDP)
    warmup_steps: int
    schedule: Literal["cosine", "step", "constant"]
    step_milestones: tuple[int, ...]
    step_gamma: float
    grad_clip: float  # 0 = off
    ema_decay: float  # moving average of the weights (polydet.train.ema); 0 = off
    log_every: int  # steps per 'train' row of history.csv (loss averaged over them)
    checkpoint_every: int  # steps; 0 = only at the end
    snapshot_every: int  # steps; >0 keeps a model file per N steps (learning curves); 0 = off
    seed: int
    augment: AugmentConfig
    out: str

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "max_steps": self.max_steps >= 0,
            "batch_size": self.batch_size >= 1,
            "num_workers": self.num_workers >= -1,
            "lr": self.lr > 0.0,
            "momentum": 0.0 <= self.momentum < 1.0,
            "weight_decay": self.weight_decay >= 0.0,
            "warmup_steps": self.warmup_steps >= 0,
            "step_milestones": all(m >= 0 for m in self.step_milestones),
            "step_gamma": self.step_gamma > 0.0,
            "grad_clip": self.grad_clip >= 0.0,
            "ema_decay": 0.0 <= self.ema_decay < 1.0,
            "log_every": self.log_every >= 1,
            "checkpoint_every": self.checkpoint_every >= 0,
            "snapshot_every": self.snapshot_every >= 0,
            "seed": 0 <= self.seed < 2**32,  # NumPy's seed range
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"train.{key}: value {getattr(self, key)!r} is out of range")


@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation (polydet.eval.tta): the identity view plus one view per entry."""

    enabled: bool
    flips: tuple[Literal["h", "v"], ...]  # h = left-right mirror, v = top-bottom
    rot90: tuple[int, ...]  # quarter turns (1, 2, 3) of torch.rot90
    scales: tuple[float, ...]  # model input size x s (min_size / max_size); torch runtime only
    # views turned by these degrees (not quarter turns) on a canvas that holds the whole image
    angles: tuple[float, ...]
    fusion: Literal["nms", "weighted"]  # polygon NMS, or corner-aligned score-weighted average
    iou_threshold: float  # polygon IoU above which views' detections (same class) are one object
    # weighted fusion: weight = score x (axis alignment in the detection's view + 0.05)^this
    align_power: float

    def __post_init__(self) -> None:
        checks = {
            "flips": len(set(self.flips)) == len(self.flips),
            "rot90": len(set(self.rot90)) == len(self.rot90) and set(self.rot90) <= {1, 2, 3},
            "scales": all(s > 0 and s != 1.0 for s in self.scales),
            "angles": len(set(self.angles)) == len(self.angles)
            and all(a % 90 != 0 and -360 < a < 360 for a in self.angles),
            "align_power": self.align_power >= 0,
            "iou_threshold": 0.0 < self.iou_threshold <= 1.0,
        }
        check_ranges("evaluate.tta", self, checks)


def tta_config_from_dict(raw: dict) -> TTAConfig:
    """A :class:`TTAConfig` from a plain mapping (e.g. logged with an MLflow model). Models
    logged before angle views existed had none, and plain score weights."""
    return _build(TTAConfig, {"angles": [], "align_power": 0.0, **raw}, "evaluate.tta")


@dataclass(frozen=True)
class EvaluateConfig:
    split: Literal["train", "val", "test"]
    iou_threshold: float  # DOTA Task1 AP counts IoU > this (0.5)
    batch_size: int  # images per predict call
    score_thresh: float  # operating point of the confusion summary
    size_bounds: tuple[float, float]  # sides (px) of the areas parting small/medium/large
    precision_targets: tuple[float, ...]  # report the recall reached at these precisions
    tile_merge: Literal["per_class", "class_agnostic"]  # polygon NMS of tile detections (predict)
    tta: TTAConfig
    out: str

    def __post_init__(self) -> None:
        lo, hi = self.size_bounds
        checks = {
            "iou_threshold": 0.0 < self.iou_threshold < 1.0,
            "batch_size": self.batch_size >= 1,
            "size_bounds": 0.0 < lo < hi,
            "precision_targets": all(0.0 < p <= 1.0 for p in self.precision_targets),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"evaluate.{key}: value {getattr(self, key)!r} is out of range")


@dataclass(frozen=True)
class DebugConfig:
    split: Literal["train", "val", "test"]
    num_images: int  # first images of the split that are inspected and drawn
    top_n_proposals: int  # RPN recall and objectness are measured on this many per image
    out: str

    def __post_init__(self) -> None:
        for key in ("num_images", "top_n_proposals"):
            if getattr(self, key) < 1:
                raise ConfigError(f"debug.{key}: value {getattr(self, key)!r} is out of range")


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str
    model_name: str
    promote_margin: float  # champion replaced only if test AP50 beats it by this much
    default_uri: str  # used when MLFLOW_TRACKING_URI is not set
    out: str  # registration.json: the model version and aliases of the last pipeline run


@dataclass(frozen=True)
class Config:
    data: DataConfig
    synth: SynthConfig
    anchors: AnchorsConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    debug: DebugConfig
    tracking: TrackingConfig


# A decimal number as people type it: 3e-4, 1e6, 1E+3, .5, 2. (YAML 1.1 wants 3.0e-4).
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; errors name ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e6 and 3e-4 (no dot) as strings
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if value != value or abs(value) == float("inf"):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]}")
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            raise ConfigError(f"missing key {key}")
        kwargs[name] = _convert(hints[name], raw[name], key)
    return cls(**kwargs)


# Keys a section gets from another one at load time (module docstring): key -> its source.
DERIVED = {
    "synth.classes": "data.classes",
    "model.num_classes": "data.classes",  # 1 + len(data.classes): background is label 0
    "model.anchor_sizes": "anchors.sizes",
    "model.aspect_ratios": "anchors.aspect_ratios",
}
# Why each one is not a setting of its own (said in the error for a file that still sets it).
_WHY = {
    "synth.classes": "the synthetic dataset draws the classes the model learns",
    "model.anchor_sizes": "the anchors section owns the configured anchors; training uses "
    "the fitted anchors.json, else these",
    "model.aspect_ratios": "the anchors section owns the configured anchors; training uses "
    "the fitted anchors.json, else these",
}


_ABSENT = object()


def _get(raw: dict, dotted: str) -> Any:
    section, key = dotted.split(".")
    node = raw.get(section)
    return node.get(key, _ABSENT) if isinstance(node, dict) else _ABSENT


def _derive(raw: dict) -> None:
    """Reject copies of :data:`DERIVED` keys in ``raw`` (a parsed params file), then fill them
    in from their sources. A source that is missing or malformed is left to :func:`_build`."""
    classes = _get(raw, "data.classes")
    for dotted, source in DERIVED.items():
        given, value = _get(raw, dotted), _get(raw, source)
        if dotted == "model.num_classes":
            value = len(classes) + 1 if isinstance(classes, list) else _ABSENT
            if given is not _ABSENT and value is not _ABSENT and given != value:
                raise ConfigError(
                    f"model.num_classes is {given!r}, but data.classes has {len(classes)} "
                    f"classes (+ background = {value}): delete model.num_classes (it is "
                    f"derived from data.classes) or set it to {value}",
                    key=dotted,
                )
        elif given is not _ABSENT:
            if given == value:
                hint = f"{source} has the same value"
            elif value is _ABSENT:
                hint = f"and set {source} to {given!r}"
            else:
                hint = f"to keep {given!r}, set {source} to it: it is {value!r}"
            raise ConfigError(
                f"{dotted} is no longer a setting ({_WHY[dotted]}): {source} is the one "
                f"place for it; delete {dotted} ({hint})",
                key=dotted,
            )
        section, key = dotted.split(".")
        if value is not _ABSENT and isinstance(raw.get(section), dict):
            raw[section][key] = value


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    dotted, text = item.split("=", 1)
    if dotted.strip() in DERIVED:
        source = DERIVED[dotted.strip()]
        raise ConfigError(f"--set {item}: {dotted.strip()} is derived from {source}; set {source}")
    parts = dotted.strip().split(".")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"unknown key {dotted}")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"unknown key {dotted}")
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {item}: the value is not valid YAML ({problem})") from None


def config_from_dict(raw: dict, overrides: typing.Iterable[str] = ()) -> Config:
    """Build a :class:`Config` from a plain mapping (a parsed ``params.yaml``)."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, plain types only
    for item in overrides:
        _apply_override(raw, item)
    _derive(raw)
    cfg = _build(Config, raw, "")
    _cross_check(cfg)
    return cfg


def _cross_check(cfg: Config) -> None:
    levels = len(cfg.model.returned_layers) + 1
    if len(cfg.anchors.sizes) != levels:
        raise ConfigError(
            f"anchors.sizes: {len(cfg.anchors.sizes)} levels, but model.returned_layers "
            f"{list(cfg.model.returned_layers)} + the pooled level give {levels} FPN levels"
        )
    check_model_config(cfg.model)
    s = cfg.data.split
    if abs(s.train + s.val + s.test - 1.0) > 1e-6:
        raise ConfigError("data.split: train + val + test must be 1")


def load_config(path: str | Path = "params.yaml", overrides: typing.Iterable[str] = ()) -> Config:
    """Load and validate ``params.yaml``; a bad file raises :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        line = _line_of(data.decode("utf-8"), e.key) if e.key else None
        raise ConfigError(f"{path}{f':{line}' if line else ''}: {e}") from e


def _line_of(text: str, dotted: str) -> int | None:
    """1-based line of the dotted key in the YAML ``text`` (``None`` if it is not there)."""
    node: Any = yaml.compose(text)
    line = None
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        match = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
        if not match:
            return None
        line, node = match[0][0].start_mark.line + 1, match[0][1]
    return line


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists for tuples) of a config or section, e.g. for checkpoints."""
    return yaml.safe_load(yaml.safe_dump(plain(dataclasses.asdict(cfg))))


def plain(x: Any) -> Any:
    """``x`` with every tuple turned into a list, nested mappings and lists included (the
    form YAML, JSON and ``torch.load(weights_only=True)`` give back)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    return x


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 0.01, ...}``: the config as flat dotted keys (for MLflow params)."""
    return flatten_dict(to_dict(cfg))


def flatten_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping into dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
