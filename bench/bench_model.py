"""PolyDetector against torchvision's FasterRCNN: training-step and inference time, peak memory.

Both models get the same backbone (a copy of polydet's), anchors, RPN / RoI settings,
images, batch and ground truths (random quads; torchvision gets their enclosing boxes), all
from ``params.yaml``'s ``model`` section. Runs alternate between the two models so that load
from other processes hits both alike; the median (and min) of ``--iters`` runs is reported.
Memory is the most a single call raised the process's RSS above its level before the call
(``/proc/self/clear_refs`` resets the peak on Linux). Untrained models score every proposal
about 1/num_classes, so inference post-processes the maximum number of candidates: the worst
case for polygon NMS.

    .venv/bin/python bench/bench_model.py [--params params.yaml] [--batch 4] [--iters 10]
        [--set model.backbone=mobilenet_v3_fpn ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from polydet.config import ModelConfig, load_config
from polydet.model import PolyDetector, build_model
from polydet.polybox import from_corners, hull_xyxy


def torchvision_twin(model: PolyDetector) -> FasterRCNN:
    """torchvision's Faster R-CNN with the same backbone, anchors and settings."""
    cfg: ModelConfig = model.cfg
    rpn, roi = cfg.rpn, cfg.roi
    generator = model.rpn.anchor_generator
    channels = model.backbone.out_channels
    return FasterRCNN(
        copy.deepcopy(model.backbone),
        num_classes=None,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_anchor_generator=AnchorGenerator(generator.sizes, generator.aspect_ratios),
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn.post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.fg_iou_thresh,
        rpn_bg_iou_thresh=rpn.bg_iou_thresh,
        rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        rpn_score_thresh=rpn.score_thresh,
        box_roi_pool=MultiScaleRoIAlign(
            model.roi_heads.box_roi_pool.featmap_names, roi.pool_size, sampling_ratio=2
        ),
        box_head=TwoMLPHead(channels * roi.pool_size**2, roi.representation_size),
        box_predictor=FastRCNNPredictor(roi.representation_size, cfg.num_classes),
        box_score_thresh=roi.score_thresh,
        box_nms_thresh=roi.nms_thresh,
        box_detections_per_img=roi.detections_per_img,
        box_fg_iou_thresh=roi.fg_iou_thresh,
        box_bg_iou_thresh=roi.bg_iou_thresh,
        box_batch_size_per_image=roi.batch_size_per_image,
        box_positive_fraction=roi.positive_fraction,
    )


def random_data(
    cfg: ModelConfig, batch: int, seed: int
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``batch`` images of the model's input size with 1-5 random rotated rectangles each."""
    g = torch.Generator().manual_seed(seed)
    size = cfg.min_size
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand((3, size, size), generator=g))
        n = int(torch.randint(1, 6, (1,), generator=g))
        centre = torch.rand((n, 1, 2), generator=g) * size * 0.6 + size * 0.2
        wh = (torch.rand((n, 1, 2), generator=g) * 0.3 + 0.1) * size
        angle = torch.rand((n, 1), generator=g) * math.pi
        unit = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        local = unit * wh  # [n, 4, 2]
        cos, sin = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
        rotated = torch.cat(
            [
                local[..., :1] * cos - local[..., 1:] * sin,
                local[..., :1] * sin + local[..., 1:] * cos,
            ],
            dim=-1,
        )
        labels = torch.randint(1, cfg.num_classes, (n,), generator=g)
        targets.append({"polyboxes": from_corners(rotated + centre), "labels": labels})
    return images, targets


def _status_mib(key: str) -> float | None:
    """A ``/proc/self/status`` memory line (``VmRSS``, ``VmHWM``) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench(
    runs: dict[str, Callable[[], None]], iters: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median / min seconds of each callable (interleaved) and the most memory one call added
    on top of the process's RSS before it (``extra_rss_mib``; the peak RSS of the whole
    process, ``ru_maxrss``, where ``/proc`` cannot be reset)."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    extra = dict.fromkeys(runs, 0.0)
    for _ in range(iters):
        for name, fn in runs.items():
            before = _status_mib("VmRSS") if _reset_peak() else None
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            peak = _status_mib("VmHWM")
            if before is None or peak is None:
                used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            else:
                used = peak - before
            extra[name] = max(extra[name], used)
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "extra_rss_mib": extra[name]}
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    cfg = load_config(args.params, args.set).model
    torch.manual_seed(0)
    ours = build_model(cfg)
    tv = torchvision_twin(ours)
    images, targets = random_data(cfg, args.batch, seed=0)
    tv_targets = [{"boxes": hull_xyxy(t["polyboxes"]), "labels": t["labels"]} for t in targets]
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
    opt_tv = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)

    def train_ours() -> None:
        loss = sum(ours.loss(images, targets).values())
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()

    def train_tv() -> None:
        loss = sum(tv(images, tv_targets).values())
        opt_tv.zero_grad()
        loss.backward()
        opt_tv.step()

    ours.train()
    tv.train()
    train = bench({"polydet": train_ours, "torchvision": train_tv}, args.iters, args.warmup)
    ours.eval()
    tv.eval()

    def infer_tv() -> None:
        with torch.no_grad():
            tv(images)

    infer = bench(
        {"polydet": lambda: ours.predict(images), "torchvision": infer_tv}, args.iters, args.warmup
    )
    result = {
        "backbone": cfg.backbone,
        "fpn_channels": cfg.fpn_channels,
        "image_size": cfg.min_size,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "train_step": train,
        "inference": infer,
        "train_ratio": train["polydet"]["median_s"] / train["torchvision"]["median_s"],
        "inference_ratio": infer["polydet"]["median_s"] / infer["torchvision"]["median_s"],
        "train_ratio_min": train["polydet"]["min_s"] / train["torchvision"]["min_s"],
        "inference_ratio_min": infer["polydet"]["min_s"] / infer["torchvision"]["min_s"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
