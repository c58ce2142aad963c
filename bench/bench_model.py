"""PolyDetector against torchvision's FasterRCNN: training-step and inference time, peak memory.

Both models get the same backbone (a copy of polydet's), anchors, RPN / RoI settings,
images, batch and ground truths (random quads; torchvision gets their enclosing boxes), all
from ``params.yaml``'s ``model`` section. Runs alternate between the two models so that load
from other processes hits both alike; the median of ``--iters`` runs is reported, in wall
time and in process CPU time (steadier on a shared machine). Peak memory is ``ru_maxrss`` of
one fresh child process per model (both models built, only one of them run), so both
sides share the same baseline; ``run_rss_mib`` is how far the runs raised it. Untrained models score every proposal about
1/num_classes, so inference post-processes the maximum number of candidates: the worst case
for polygon NMS.

    .venv/bin/python bench/bench_model.py [--params params.yaml] [--batch 4] [--iters 10]
        [--threads N] [--set model.backbone=mobilenet_v3_fpn ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from polydet.core.config import ModelConfig, load_config
from polydet.geometry.polybox import from_corners, hull_xyxy
from polydet.model import PolyDetector, build_model


class _RPNWithoutFinestLevel(torch.nn.Module):
    """torchvision's RPN fed all FPN levels but the first, as ``model.fine_roi_level`` does."""

    def __init__(self, rpn: torch.nn.Module) -> None:
        super().__init__()
        self.rpn = rpn

    def forward(self, images, features, targets=None):  # noqa: ANN001, ANN201
        return self.rpn(images, dict(list(features.items())[1:]), targets)


def torchvision_twin(model: PolyDetector) -> FasterRCNN:
    """torchvision's Faster R-CNN with the same backbone, anchors and settings."""
    cfg: ModelConfig = model.cfg
    rpn, roi = cfg.rpn, cfg.roi
    generator = model.rpn.anchor_generator
    channels = model.backbone.out_channels
    twin = FasterRCNN(
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
            model.roi_heads.box_roi_pool.featmap_names,
            roi.pool_size,
            sampling_ratio=roi.sampling_ratio,
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
    if cfg.fine_roi_level:
        twin.rpn = _RPNWithoutFinestLevel(twin.rpn)
    return twin


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


def bench(
    runs: dict[str, Callable[[], None]], iters: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median / min wall seconds and median process CPU seconds (less sensitive to other
    processes' load) of each callable, the callables interleaved."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, fn in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "median_cpu_s": statistics.median(cpu[name]),
        }
        for name, t in wall.items()
    }


def setup(
    params: str, overrides: list[str], batch: int
) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]], ModelConfig]:
    """Training-step and inference callables of both models, on the same data."""
    cfg = load_config(params, overrides).model
    torch.manual_seed(0)
    ours = build_model(cfg)
    tv = torchvision_twin(ours)
    images, targets = random_data(cfg, batch, seed=0)
    tv_targets = [{"boxes": hull_xyxy(t["polyboxes"]), "labels": t["labels"]} for t in targets]
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
    opt_tv = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)

    def train_ours() -> None:
        ours.train()
        loss = sum(ours.loss(images, targets).values())
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()

    def train_tv() -> None:
        tv.train()
        loss = sum(tv(images, tv_targets).values())
        opt_tv.zero_grad()
        loss.backward()
        opt_tv.step()

    def infer_ours() -> None:
        ours.eval()
        ours.predict(images)

    def infer_tv() -> None:
        tv.eval()
        with torch.no_grad():
            tv(images)

    train = {"polydet": train_ours, "torchvision": train_tv}
    infer = {"polydet": infer_ours, "torchvision": infer_tv}
    return train, infer, cfg


def _peak_rss_mib() -> float:
    """This process's peak RSS in MiB. ``VmHWM`` where available: ``ru_maxrss`` survives
    fork + exec, so a child would report its parent's peak if that were higher."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_child(args: argparse.Namespace, name: str) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh process that builds both models and runs only ``name``'s
    training step and inference twice (the same baseline on both sides), and how far it
    rose above the peak after the set-up."""
    train, infer, _ = setup(args.params, args.set, args.batch)
    base = _peak_rss_mib()
    for _ in range(2):
        train[name]()
        infer[name]()
    peak = _peak_rss_mib()
    return {"peak_rss_mib": peak, "run_rss_mib": peak - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--peak-of", choices=["polydet", "torchvision"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of:  # child process of the memory measurement
        print(json.dumps(_peak_child(args, args.peak_of)))
        return

    # Memory first, while this process is still small.
    memory = {}
    for name in ("polydet", "torchvision"):
        child = subprocess.run(
            [sys.executable, *sys.argv, "--peak-of", name],
            check=True,
            capture_output=True,
            text=True,
        )
        memory[name] = json.loads(child.stdout.splitlines()[-1])
    train_runs, infer_runs, cfg = setup(args.params, args.set, args.batch)
    train = bench(train_runs, args.iters, args.warmup)
    infer = bench(infer_runs, args.iters, args.warmup)
    for name, used in memory.items():
        train[name].update(used)

    def ratio(table: dict[str, dict[str, float]], key: str) -> float | None:
        ref = table["torchvision"][key]
        return table["polydet"][key] / ref if ref > 0 else None

    result = {
        "backbone": cfg.backbone,
        "fpn_channels": cfg.fpn_channels,
        "image_size": cfg.min_size,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        # The instruction set ATen's kernels run with (ATEN_CPU_CAPABILITY=avx2 forces AVX2 on
        # an AVX-512 machine: the slowest CPU of this machine kind has no AVX-512).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
        "train_step": train,
        "inference": infer,
        "train_ratio": ratio(train, "median_s"),
        "train_ratio_cpu": ratio(train, "median_cpu_s"),
        "inference_ratio": ratio(infer, "median_s"),
        "inference_ratio_cpu": ratio(infer, "median_cpu_s"),
        "peak_rss_ratio": ratio(train, "peak_rss_mib"),
        "run_rss_ratio": ratio(train, "run_rss_mib"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
