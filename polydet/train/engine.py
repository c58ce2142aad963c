"""The training engine: ``train(cfg, resume=None) -> dict`` (docs/CONTRACTS.md).

One loop for every setting: CPU or CUDA (mixed precision with ``torch.autocast``: float16
and a ``GradScaler`` on CUDA, bfloat16 on CPUs with fast bfloat16), one process or several under ``torchrun`` (DDP; rank 0 alone writes). The
run is reproducible and resumable bit for bit on CPU:

* the data order comes from a seeded :class:`~polydet.train.distributed.ResumableSampler` whose
  position is stored in the checkpoint (the step), so a resumed run sees the same batches;
* each sample's augmentation is drawn from a seed derived from ``(seed, epoch, index)``
  (:class:`SeededItems`), independent of worker processes and of where a run resumed;
* the global generators (used by the model's RPN / RoI samplers) are checkpointed per rank.

Outputs under ``cfg.train.out``: ``model.pt``, ``checkpoints/last.pt``, ``history.csv``,
``summary.json`` and, when a loss goes non-finite, ``nonfinite.json``.

Run on several devices with ``torchrun --nproc-per-node N -m polydet.cli train [--params ...]``
(the same arguments as ``polydet train``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from polydet.core.config import Config, ConfigError, TrainConfig, flatten_dict, to_dict
from polydet.core.errors import DataError, ModelError, PolydetError
from polydet.core.files import remove_stale_temps, write_text
from polydet.data.dataset import PolyDataset, collate
from polydet.model import build_model, save_model
from polydet.model.device import resolve_device
from polydet.train.anchors import load_anchors
from polydet.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from polydet.train.distributed import (
    DistInfo,
    ResumableSampler,
    all_gather_objects,
    all_reduce_sum,
    average_buffers,
    barrier,
    cleanup_distributed,
    dist_info_from_env,
    init_distributed,
    state_digest,
)
from polydet.train.ema import WeightEma

LOSS_TERMS = (
    "loss_rpn_objectness",
    "loss_rpn_polybox",
    "loss_classifier",
    "loss_polybox",
    "loss_polybox_iou",
    "loss_refine",
    "loss_heading",
    "loss_quality",
    "loss_quad_classifier",
    "loss_quad_polybox",
)
HISTORY_COLUMNS = ("step", "epoch", "split", "lr", "loss", *LOSS_TERMS, "images_per_s")
# Warm-up starts at this share of the learning rate (as torchvision's detection references).
WARMUP_START = 0.001


class NonFiniteLossError(PolydetError):
    """A loss term became NaN or infinite; ``nonfinite.json`` says which, where and on what."""


class TrainingInterrupted(PolydetError):
    """Ctrl-C (SIGINT) during training: the message names the last checkpoint and how to
    resume from it. The command line exits with 130, as for any interrupted command."""

    exit_code = 130


# --- setup -------------------------------------------------------------------------------


def autocast_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype of ``train.amp``: float16 on CUDA; bfloat16 on a CPU whose
    oneDNN has fast bfloat16 kernels (AVX-512 or AMX: 1.5x faster steps measured on an
    AVX512-BF16 EPYC); ``None`` (float32) otherwise, where emulated bfloat16 would be slower."""
    if not tc.amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and _cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast path
        return False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the legacy global generator is what we seed
    torch.manual_seed(seed)


def param_groups(model: nn.Module, tc: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weights with ``train.weight_decay``, and
    normalisation parameters and biases (every parameter of fewer than 2 dimensions) without
    it unless ``train.decay_norm_and_bias`` (decaying a norm's scale towards 0 fights the
    normalisation; torchvision's reference recipes and timm exempt them)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 and not tc.decay_norm_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def base_lr(tc: TrainConfig, world_size: int) -> float:
    """``train.lr`` is the rate of one process's batch of ``train.batch_size`` images; with
    ``train.lr_scaling: linear`` it grows with the global batch (Goyal et al.'s rule)."""
    return tc.lr * (world_size if tc.lr_scaling == "linear" else 1)


def build_optimizer(
    model: nn.Module, tc: TrainConfig, world_size: int = 1
) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the trainable parameters (:func:`param_groups`)."""
    groups, lr = param_groups(model, tc), base_lr(tc, world_size)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=tc.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(step: int, total_steps: int, tc: TrainConfig) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    Linear warm-up from :data:`WARMUP_START` over ``warmup_steps``, times the schedule:
    cosine from 1 to 0 over the steps after the warm-up, ``step_gamma`` at every
    ``step_milestones`` step passed, or constant.
    """
    warm = 1.0
    if tc.warmup_steps > 0 and step < tc.warmup_steps:
        warm = WARMUP_START + (1.0 - WARMUP_START) * step / tc.warmup_steps
    if tc.schedule == "cosine":
        span = max(1, total_steps - tc.warmup_steps)
        progress = min(1.0, max(0.0, (step - tc.warmup_steps) / span))
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    if tc.schedule == "step":
        return warm * tc.step_gamma ** sum(step >= m for m in tc.step_milestones)
    return warm


class SeededItems(Dataset):
    """Wraps a dataset so that item ``(epoch, index)`` is drawn with its own seed.

    The global generators are seeded from ``(seed, epoch, index)`` around the wrapped
    ``__getitem__`` and restored afterwards, so augmentation is a function of the sample
    alone (same in worker processes, after a resume, on any rank), and loading data does
    not disturb the generator stream the model's samplers draw from.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        epoch, index = item
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with _seeded_global_rng(sample_seed):
            return self.dataset[index]


@contextlib.contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    with torch.random.fork_rng(devices=[]):
        seed_everything(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


def num_workers(tc: TrainConfig, device: torch.device, world_size: int) -> int:
    """Data-loading processes: ``train.num_workers``, or for ``-1`` (auto) up to 4 per GPU
    process on CUDA (decoding overlaps the GPU's work) and none on CPU (the cores are busy
    training; decoding a small PNG takes about a millisecond)."""
    if tc.num_workers >= 0:
        return tc.num_workers
    if device.type != "cuda":
        return 0
    return max(1, min(4, (os.cpu_count() or 1) // max(1, world_size) - 1))


def _loader(
    dataset: Dataset, sampler: ResumableSampler, tc: TrainConfig, device: torch.device, workers: int
) -> DataLoader:
    """A loader over ``sampler``'s current position (re-read at every ``iter``)."""
    return DataLoader(
        SeededItems(dataset, tc.seed),
        batch_size=tc.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        # A private generator: creating a loader must not draw from the global stream,
        # or a run resumed mid-epoch would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(tc.seed),
    )


def _to_device(
    images: list[Tensor], targets: list[dict[str, Any]], device: torch.device
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [
        {k: v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


# --- history -----------------------------------------------------------------------------


class History:
    """``history.csv`` written row by row (rank 0 only), so a crash keeps what was logged."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def start(self, keep_until: int | None) -> None:
        """Begin a new file, or keep the rows up to step ``keep_until`` of a resumed run."""
        if not self.enabled:
            return
        rows: list[dict[str, str]] = []
        if keep_until is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=HISTORY_COLUMNS).writerow(row)


def split_history(path: Path) -> None:
    """``history_train.csv`` and ``history_val.csv`` beside ``history.csv``, one kind of row
    each: a plot of a column is then one line per split (``dvc plots`` joins all of a file's
    rows into one line, which zig-zagged between train and validation)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for split in ("train", "val"):
        with path.with_name(f"history_{split}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            writer.writerows(r for r in rows if r["split"] == split)


def _fmt(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in values.items()}


# --- the loop ----------------------------------------------------------------------------


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train the detector on ``cfg.data.out``'s train split; write ``cfg.train.out``.

    ``resume``: a checkpoint path, or ``"last"`` for ``{train.out}/checkpoints/last.pt``.
    Returns the summary written to ``summary.json`` (on every rank; only rank 0 writes).
    Raises :class:`NonFiniteLossError` when a loss term goes NaN/inf (the last checkpoint
    stays as it was).
    """
    info = dist_info_from_env()
    device = resolve_device(cfg.train.device, info.local_rank, info.distributed)
    joined = info.distributed and not torch.distributed.is_initialized()
    init_distributed(info, device)
    try:
        return _train(cfg, resume, info, device)
    finally:
        if joined:
            cleanup_distributed()


def _resume_path(cfg: Config, resume: str) -> Path:
    if resume == "last":
        return Path(cfg.train.out) / "checkpoints" / "last.pt"
    return Path(resume)


def _check_resume_config(cfg: Config, saved: dict[str, Any], path: Path) -> list[str]:
    """Keys whose value differs from the checkpoint's; a different model is an error."""
    now = flatten_dict(to_dict(cfg))
    then = flatten_dict(saved)
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    model_changes = [k for k in changed if k.startswith("model.")]
    if model_changes:
        k = model_changes[0]
        raise ConfigError(
            f"{path} was trained with {k}={then.get(k)!r}, the params give {now.get(k)!r}: "
            "a checkpoint resumes only the model it was made with"
        )
    return [k for k in changed if k != "train.out"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()}, {torch.get_num_threads()} threads"


def _train(cfg: Config, resume: str | None, info: DistInfo, device: torch.device) -> dict[str, Any]:
    tc = cfg.train
    out = Path(tc.out)
    last_ckpt = out / "checkpoints" / "last.pt"
    started = time.perf_counter()
    if info.is_main:  # temp files of checkpoint / model writes a killed run left behind
        for leftover in remove_stale_temps(last_ckpt.parent) + remove_stale_temps(out):
            print(f"polydet train: removed {leftover} (an interrupted write)", file=sys.stderr)

    state: dict[str, Any] | None = None
    if resume:
        resume_file = _resume_path(cfg, resume)
        # On the CPU: load_state_dict copies onto the device; RNG states must stay there.
        state = load_checkpoint(resume_file, map_location="cpu")
        broken = nonfinite_tensors(state["model"])
        if broken:  # written by an older polydet, which did not check
            raise ModelError(
                f"{resume_file}: {len(broken)} weight tensors hold NaN or infinite values "
                f"(e.g. {broken[0]}); it cannot be resumed: train again without --resume"
            )
        changed = _check_resume_config(cfg, state["config"], resume_file)
        if changed and info.is_main:
            print(
                f"polydet train: resuming with changed settings: {', '.join(changed)}",
                file=sys.stderr,
            )
        if int(state["world_size"]) != info.world_size and info.is_main:
            # Steps count global batches, whose size and shards depend on the process count.
            print(
                f"polydet train: {resume_file} was written by {state['world_size']} process(es), "
                f"this run has {info.world_size}: the data order will not continue exactly",
                file=sys.stderr,
            )

    seed_everything(tc.seed)
    train_set = PolyDataset(cfg.data.out, "train", tc.augment)
    if len(train_set) == 0:
        raise DataError(f"{cfg.data.out}: the train split has no images")
    val_set = PolyDataset(cfg.data.out, "val", None)
    if info.is_main and not any(len(r.labels) for r in train_set.records):
        print(
            f"polydet train: warning: the train split of {cfg.data.out} has no objects: the "
            "detector can only learn that everything is background",
            file=sys.stderr,
        )

    anchors = state["anchors"] if state is not None else load_anchors(cfg)
    model = build_model(cfg.model, anchors=anchors).to(device)
    optimizer = build_optimizer(model, tc, info.world_size)
    ema = WeightEma(model, tc.ema_decay) if tc.ema_decay > 0 else None

    sampler = ResumableSampler(train_set, info.world_size, info.rank, shuffle=True, seed=tc.seed)
    steps_per_epoch = math.ceil(len(sampler) / tc.batch_size)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps > 0:
        total_steps = min(total_steps, tc.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, tc)
    )
    amp = autocast_dtype(tc, device)
    precision = {torch.float16: "fp16-mixed", torch.bfloat16: "bf16-mixed"}.get(amp, "fp32")
    # Loss scaling is for float16's narrow range; bfloat16 has float32's exponent.
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    step, images_seen, elapsed_before = 0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            else:  # a checkpoint of a run without the average: start it from these weights
                ema = WeightEma(model, tc.ema_decay)
        step, images_seen = int(state["step"]), int(state["images_seen"])
        elapsed_before = float(state["elapsed_s"])

    history = History(out / "history.csv", info.is_main)
    history.start(keep_until=step if state is not None else None)
    if info.is_main:
        (out / "nonfinite.json").unlink(missing_ok=True)
        print(
            f"polydet train: device {device} ({_device_name(device)}), precision {precision}, "
            f"{info.world_size} process(es), {len(train_set)} train / {len(val_set)} val "
            f"images, {steps_per_epoch} steps per epoch, steps {step}->{total_steps}",
            file=sys.stderr,
        )

    # PolyDetector.forward is .loss: DDP hooks forward, so the step must call the wrapper.
    net: nn.Module = model
    if info.distributed:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    workers = num_workers(tc, device, info.world_size)
    train_loader = _loader(train_set, sampler, tc, device, workers)
    val_sampler = ResumableSampler(val_set, info.world_size, info.rank, shuffle=False)
    val_loader = _loader(val_set, val_sampler, tc, device, workers) if len(val_set) else None

    # Generators last: everything above (model init included) is replayed identically.
    if state is not None:
        rng = state["rng"]
        restore_rng_state(rng[info.rank] if len(rng) == info.world_size else rng[0])

    ctx = _Loop(cfg, info, device, model, net, optimizer, scheduler, scaler, amp, anchors, history)
    ctx.ema = ema
    ctx.total_steps, ctx.steps_per_epoch, ctx.last_ckpt = total_steps, steps_per_epoch, last_ckpt
    ctx.elapsed_before, ctx.session_start = elapsed_before, started
    ctx.step, ctx.images_seen = step, images_seen
    if state is not None:
        ctx.restore_window(state["log_window"])
    try:
        ctx.run(train_loader, sampler, val_loader)
    except KeyboardInterrupt:
        raise TrainingInterrupted(ctx.interrupted_message()) from None

    if ema is not None:  # the average is the model training hands on
        ema.copy_to(model)
    average_buffers(model, info)
    digests = all_gather_objects(state_digest(model), info)
    wall = elapsed_before + time.perf_counter() - started
    summary: dict[str, Any] = {
        "device": str(device),
        "device_name": _device_name(device),
        "precision": precision,
        "world_size": info.world_size,
        "steps": ctx.step,
        "epochs": ctx.step / steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": tc.batch_size,
        "images_seen": ctx.images_seen,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(ctx.images_seen / wall, 3) if wall > 0 else 0.0,
        "final_losses": {"train": _fmt(ctx.last_train), "val": _fmt(ctx.last_val)},
        "weights_sha256": digests,
        "resumed_from": str(_resume_path(cfg, resume)) if resume else None,
        "model": str(out / "model.pt"),
        "checkpoint": str(last_ckpt),
    }
    if info.is_main:
        save_model(model, out / "model.pt", cfg.model, list(cfg.data.classes), anchors)
        write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        split_history(out / "history.csv")
    barrier(info)
    return summary


class _Loop:
    """The mutable state of one training session and its step / validate / checkpoint."""

    # Set by _train before run(): the schedule, where this session starts, and its clock.
    total_steps: int
    steps_per_epoch: int
    last_ckpt: Path
    step: int
    images_seen: int
    elapsed_before: float  # seconds trained by the sessions this one resumes
    session_start: float
    ema: WeightEma | None = None  # the weights' moving average (train.ema_decay), if on

    def __init__(
        self,
        cfg: Config,
        info: DistInfo,
        device: torch.device,
        model: nn.Module,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        amp: torch.dtype | None,
        anchors: dict[str, list],
        history: History,
    ) -> None:
        self.cfg, self.tc, self.info, self.device = cfg, cfg.train, info, device
        self.model, self.net = model, net
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.anchors, self.history = anchors, history
        self.amp = amp
        self.last_train: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.val_step: int | None = None  # the step last_val was measured at
        # Loss sums [terms..., total] of the steps since the last 'train' history row.
        self.window = torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64, device=device)
        self.window_steps = 0
        self.window_images = 0

    def restore_window(self, window: dict[str, Any]) -> None:
        """Continue the open logging window saved in a checkpoint."""
        self.window.copy_(window["sums"])
        self.window_steps, self.window_images = int(window["steps"]), int(window["images"])

    def run(
        self, train_loader: DataLoader, sampler: ResumableSampler, val_loader: DataLoader | None
    ) -> None:
        """Train from ``self.step`` to ``self.total_steps``: log, validate, checkpoint."""
        tc = self.tc
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.info.is_main,
            dynamic_ncols=True,
            file=sys.stderr,
            # In a log file (DVC, Prefect, CI) every refresh is another line: fewer of them.
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        window_start = time.perf_counter()
        self.model.train()
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            sampler.set_position(epoch, (self.step % self.steps_per_epoch) * tc.batch_size)
            for images, targets in train_loader:
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                values, n_images = self._train_step(images, targets, epoch)
                self.window += values
                self.window_steps += 1
                self.window_images += n_images
                speed = self.window_images / max(1e-9, time.perf_counter() - window_start)
                end_of_epoch = self.step % self.steps_per_epoch == 0
                done = self.step >= self.total_steps
                log_now = self._log_due(self.step)
                bar.update(1)
                if log_now or self.device.type != "cuda":  # reading the window syncs CUDA
                    mean = (self.window / self.window_steps).tolist()
                    bar.set_postfix(
                        loss=f"{mean[-1]:.3f}",
                        obj=f"{mean[0]:.3f}",
                        rpn=f"{mean[1]:.3f}",
                        cls=f"{mean[2]:.3f}",
                        poly=f"{mean[3]:.3f}",
                        img_s=f"{speed:.1f}",
                        refresh=False,
                    )
                # Rows at fixed steps (not "every N steps of this session") and the open
                # window in the checkpoint: a resumed run logs the rows of an uninterrupted one.
                if log_now:
                    self.last_train = self._row("train", epoch, lr, mean, speed)
                    self.window.zero_()
                    self.window_steps, self.window_images = 0, 0
                    window_start = time.perf_counter()
                if (end_of_epoch or done) and val_loader is not None:
                    val = self._validate(val_loader)
                    self.last_val = self._row("val", epoch, lr, val, float("nan"))
                    self.val_step = self.step
                if self._checkpoint_due(self.step):
                    self._checkpoint(epoch)
                if tc.snapshot_every > 0 and self.step % tc.snapshot_every == 0:
                    self._snapshot()
                if done:
                    break
        bar.close()

    def _row(
        self, split: str, epoch: int, lr: float, values: list[float], speed: float
    ) -> dict[str, float]:
        terms = dict(zip(LOSS_TERMS, values[: len(LOSS_TERMS)]))
        self.history.append(
            {
                "step": self.step,
                "epoch": epoch + 1,
                "split": split,
                "lr": f"{lr:.6g}",
                "loss": f"{values[-1]:.6g}",
                **{k: f"{v:.6g}" for k, v in terms.items()},
                "images_per_s": "" if math.isnan(speed) else f"{speed:.3f}",
            }
        )
        return {"loss": values[-1], **terms}

    def _autocast(self) -> torch.autocast:
        dtype = self.amp or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp is not None)

    def _losses(self, images: list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        with self._autocast():
            return self.net(images, targets)

    def _train_step(
        self, images: list[Tensor], targets: list[dict[str, Any]], epoch: int
    ) -> tuple[Tensor, int]:
        """One optimizer step; returns the rank-averaged [terms..., total] and global images."""
        images, targets = _to_device(images, targets, self.device)
        losses = self._losses(images, targets)
        loss = sum(losses.values())
        local = torch.stack(
            [losses[k].detach().float() for k in LOSS_TERMS] + [loss.detach().float()]
        )
        # One collective gives both the rank mean for logging and a shared verdict on
        # finiteness (a NaN anywhere makes the sum NaN), so every rank stops together.
        summed = all_reduce_sum(local, self.info).double()
        # On CUDA, reading a value waits for the GPU to finish the step: there the verdict
        # is read when a logging window closes or a checkpoint is due (the window's sums
        # carry a NaN of any step since the last check), not at every step.
        step = self.step + 1
        check = self.device.type != "cuda" or self._log_due(step) or self._checkpoint_due(step)
        if check and not bool(torch.isfinite(summed).all() & torch.isfinite(self.window).all()):
            self._stop_nonfinite(losses, targets, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, self.tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        n_images = len(images) * self.info.world_size  # shards are equal (DistributedSampler)
        self.images_seen += n_images
        return summed / self.info.world_size, n_images

    def _log_due(self, step: int) -> bool:
        """Whether ``step`` (1-based, finished) closes a logging window: every ``log_every``
        steps, at the end of each epoch and at the last step."""
        return (
            step % self.tc.log_every == 0
            or step % self.steps_per_epoch == 0
            or step >= self.total_steps
        )

    def _checkpoint_due(self, step: int) -> bool:
        """Whether ``step`` (1-based, finished) writes a checkpoint."""
        every = self.tc.checkpoint_every
        return step >= self.total_steps or (every > 0 and step % every == 0)

    def _averaged(self) -> contextlib.AbstractContextManager[None]:
        """Inside: the model holds the weights training hands on (the moving average, if on)."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def _validate(self, loader: DataLoader) -> list[float]:
        """Mean validation loss terms (model.loss in eval mode) of the weights training hands
        on (the moving average, if on), averaged over images."""
        with self._averaged():
            return self._validate_now(loader)

    def _validate_now(self, loader: DataLoader) -> list[float]:
        average_buffers(self.model, self.info)
        self.model.eval()
        sums = torch.zeros(len(LOSS_TERMS) + 2, dtype=torch.float64)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # The RPN / RoI samplers inside .loss draw random numbers: a fixed seed makes the
        # validation loss comparable across epochs and keeps the training stream untouched.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.tc.seed)
            loader.sampler.set_position(0)  # type: ignore[attr-defined]
            for images, targets in loader:
                images, targets = _to_device(images, targets, self.device)
                losses = self._loss_eval(images, targets)
                n = len(images)
                vals = [float(losses[k]) for k in LOSS_TERMS]
                sums += torch.tensor(
                    [*(v * n for v in vals), sum(vals) * n, n], dtype=torch.float64
                )
        sums = all_reduce_sum(sums, self.info)
        self.model.train()
        count = max(1.0, float(sums[-1]))
        return (sums[:-1] / count).tolist()

    def _loss_eval(self, images: list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        # The bare model, not the DDP wrapper: no gradient sync is wanted (or possible) here.
        with self._autocast():
            return self.model.loss(images, targets)

    def _snapshot(self) -> None:
        """A model file of the current weights, ``snapshots/step_<N>.pt`` (rank 0), for
        learning curves (``bench/learning_curve.py`` evaluates them); the moving average's
        weights when it is on, as the final model."""
        with self._averaged():
            average_buffers(self.model, self.info)
            if self.info.is_main:
                path = Path(self.tc.out) / "snapshots" / f"step_{self.step:06d}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                classes = list(self.cfg.data.classes)
                save_model(self.model, path, self.cfg.model, classes, self.anchors)

    def _checkpoint(self, epoch: int) -> None:
        average_buffers(self.model, self.info)
        # A checkpoint is a promise that training can go on from it: never write one whose
        # weights (or this step's validation loss) are NaN or infinite. Every rank holds the
        # same weights and validation sums, so every rank reaches the same verdict.
        bad = nonfinite_tensors(self.model.state_dict())
        if bad:
            self._refuse_checkpoint(epoch, "weights", bad)
        if self.val_step == self.step:
            bad_val = sorted(k for k, v in self.last_val.items() if not math.isfinite(v))
            if bad_val:
                self._refuse_checkpoint(epoch, "validation loss", bad_val)
        rng = all_gather_objects(capture_rng_state(), self.info)
        if not self.info.is_main:
            return
        save_checkpoint(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step,
                "epoch": epoch,
                "images_seen": self.images_seen,
                "elapsed_s": self.elapsed_before + time.perf_counter() - self.session_start,
                "world_size": self.info.world_size,
                "rng": rng,
                "log_window": {
                    "sums": self.window.cpu().clone(),
                    "steps": self.window_steps,
                    "images": self.window_images,
                },
                "config": to_dict(self.cfg),
                "classes": list(self.cfg.data.classes),
                "anchors": self.anchors,
            },
            self.last_ckpt,
        )

    def _stop_nonfinite(
        self, losses: dict[str, Tensor], targets: list[dict[str, Any]], epoch: int
    ) -> None:
        """Write ``nonfinite.json`` (rank 0) and raise; nothing was stepped or saved."""
        mine = {
            "rank": self.info.rank,
            "terms": {k: float(v.detach()) for k, v in losses.items()},
            "image_ids": [str(t.get("image_id", "?")) for t in targets],
        }
        ranks = all_gather_objects(mine, self.info)
        bad = sorted({k for r in ranks for k, v in r["terms"].items() if not math.isfinite(v)})
        ids = [i for r in ranks for i in r["image_ids"]]
        report = {
            "step": self.step + 1,
            "epoch": epoch + 1,
            "nonfinite_terms": bad,
            "image_ids": ids,
            "ranks": ranks,
            **self._last_good(),
        }
        path = self._write_nonfinite(report)
        shown = ", ".join(ids[:8]) + (f" (+{len(ids) - 8} more)" if len(ids) > 8 else "")
        raise NonFiniteLossError(
            f"non-finite loss at step {self.step + 1} (epoch {epoch + 1}): "
            f"{', '.join(bad) or 'total'} on images {shown}; report {path}; "
            f"{_where_good(report)}"
        )

    def _refuse_checkpoint(self, epoch: int, what: str, names: list[str]) -> None:
        """Stop instead of writing a checkpoint with non-finite ``what`` (``names`` say which)."""
        report = {
            "step": self.step,
            "epoch": epoch + 1,
            "nonfinite_terms": [f"{what}: {n}" for n in names[:20]],
            "nonfinite_in": what,
            "num_nonfinite": len(names),
            "image_ids": [],
            **self._last_good(),
        }
        path = self._write_nonfinite(report)
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        raise NonFiniteLossError(
            f"non-finite {what} at step {self.step} (epoch {epoch + 1}): {shown}; "
            f"no checkpoint written for this step; report {path}; {_where_good(report)}"
        )

    def interrupted_message(self) -> str:
        """Where training stopped, the last checkpoint and the command that resumes it."""
        good = self._last_good()
        head = f"interrupted at step {self.step} of {self.total_steps}"
        if good["last_checkpoint"] is None:
            return f"{head}; no checkpoint written yet (train.checkpoint_every), start again"
        return (
            f"{head}; last checkpoint {good['last_checkpoint']} (step "
            f"{good['last_checkpoint_step']}); resume with: polydet train --resume last "
            "(and the same --params / --set)"
        )

    def _last_good(self) -> dict[str, Any]:
        """The last checkpoint on disk, if its weights really are finite."""
        ckpt = None
        if self.last_ckpt.is_file():
            try:
                ckpt = load_checkpoint(self.last_ckpt)
            except PolydetError:
                ckpt = None
        if ckpt is None or nonfinite_tensors(ckpt["model"]):
            return {"last_checkpoint": None, "last_checkpoint_step": None}
        return {"last_checkpoint": str(self.last_ckpt), "last_checkpoint_step": int(ckpt["step"])}

    def _write_nonfinite(self, report: dict[str, Any]) -> Path:
        path = Path(self.tc.out) / "nonfinite.json"
        if self.info.is_main:
            path.write_text(json.dumps(report, indent=2) + "\n")
        return path


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding a NaN or an infinity."""
    return [
        k
        for k, v in state.items()
        if isinstance(v, Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
    ]


def _where_good(report: dict[str, Any]) -> str:
    if report["last_checkpoint"] is None:
        return "no good checkpoint to resume from (start again, e.g. with a lower train.lr)"
    return (
        f"last good checkpoint {report['last_checkpoint']} (step "
        f"{report['last_checkpoint_step']}): polydet train --resume last"
    )
