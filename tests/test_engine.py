"""The training engine: schedule, data order, RNG capture, exact resume, non-finite stop, DDP.

Everything runs the real detector at a tiny size (64x64 images, 16 FPN channels) on a
dataset of drawn quadrilaterals written straight into the prepared-dataset layout.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import FAST, one_thread  # noqa: F401  (one_thread: a fixture, used below)
from PIL import Image, ImageDraw

from polydet.core.config import Config, ConfigError, load_config
from polydet.core.errors import ModelError
from polydet.data.dataset import PolyDataset
from polydet.data.manifest import object_rows, write_tables
from polydet.geometry import polybox
from polydet.model import PolyDetector, load_model
from polydet.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from polydet.train.distributed import ResumableSampler
from polydet.train.engine import (
    HISTORY_COLUMNS,
    LOSS_TERMS,
    NonFiniteLossError,
    SeededItems,
    autocast_dtype,
    build_optimizer,
    lr_factor,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["card", "plate", "kite"]


def make_dataset(root: Path, n_train: int = 10, n_val: int = 2, size: int = 64) -> Path:
    """A prepared dataset of filled, rotated rectangles (one colour per class)."""
    rng = np.random.default_rng(0)
    images, objects = [], []
    for i in range(n_train + n_val):
        image_id, split = f"im{i:03d}", "val" if i < n_val else "train"
        im = Image.new("RGB", (size, size), (30, 30, 30))
        pen = ImageDraw.Draw(im)
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, 3))):
            cx, cy = rng.uniform(16, size - 16, 2)
            w, h = rng.uniform(10, 24, 2)
            a = rng.uniform(0, np.pi)
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2 @ rot.T + [cx, cy]
            label = int(rng.integers(1, 4))
            pen.polygon(
                [tuple(p) for p in corners],
                fill=[(220, 40, 40), (40, 220, 40), (40, 40, 220)][label - 1],
            )
            boxes.append(polybox.from_corners(torch.from_numpy(corners)).numpy())
            labels.append(label)
        path = root / "images" / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
        images.append(
            {"image_id": image_id, "path": str(path), "width": size, "height": size,
             "split": split, "num_objects": len(labels)}
        )  # fmt: skip
        zeros = np.zeros(len(labels))
        objects.append(
            object_rows(image_id, split, np.array(boxes), np.array(labels), zeros, zeros, CLASSES)
        )
    write_tables(root, pd.DataFrame(images), pd.concat(objects))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("prepared"))


def tiny_overrides(prepared: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.out={prepared}",
        f"anchors.out={out / 'no-anchors'}",
        f"train.out={out}",
        *FAST,
        "train.batch_size=2",
        "train.epochs=2",
        "train.max_steps=0",
        "train.warmup_steps=2",
        "train.lr=0.01",
        "train.log_every=2",
        "train.checkpoint_every=3",
        "train.num_workers=0",
        "train.amp=false",  # the same float32 numbers on every machine
        *extra,
    ]


def tiny_config(prepared: Path, out: Path, *extra: str) -> Config:
    return load_config(ROOT / "params.yaml", tiny_overrides(prepared, out, *extra))


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# --- pieces ----------------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_and_steps(prepared: Path, tmp_path: Path) -> None:
    tc = tiny_config(prepared, tmp_path, "train.warmup_steps=10").train
    assert lr_factor(0, 100, tc) == pytest.approx(0.001)
    assert lr_factor(5, 100, tc) == pytest.approx(0.001 + 0.999 * 0.5, rel=1e-3)
    assert lr_factor(10, 100, tc) == pytest.approx(1.0)
    assert lr_factor(55, 100, tc) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(100, 100, tc) == pytest.approx(0.0, abs=1e-12)
    factors = [lr_factor(s, 100, tc) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # monotone after warm-up
    tc = tiny_config(
        prepared, tmp_path, "train.schedule=step", "train.step_milestones=[20, 40]",
        "train.step_gamma=0.1", "train.warmup_steps=0",
    ).train  # fmt: skip
    assert [lr_factor(s, 100, tc) for s in (0, 19, 20, 39, 40, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )


def test_optimizer_exempts_norms_and_biases_from_weight_decay_and_scales_lr(
    prepared: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(prepared, tmp_path, "train.weight_decay=0.01")
    model = torch.nn.Sequential(  # only parameters are read: a small stand-in
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4),
        torch.nn.Flatten(), torch.nn.Linear(4, 2),
    )  # fmt: skip
    matrices = {id(model[0].weight), id(model[4].weight)}
    opt = build_optimizer(model, cfg.train, world_size=1)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay) == len(list(model.parameters()))  # every parameter, once
    for p in model.parameters():
        assert decay[id(p)] == (0.01 if id(p) in matrices else 0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.train.lr)
    # Linear scaling: the rate grows with the number of processes (the global batch).
    assert build_optimizer(model, cfg.train, 4).param_groups[0]["lr"] == pytest.approx(
        4 * cfg.train.lr
    )
    fixed = tiny_config(prepared, tmp_path, "train.lr_scaling=none").train
    assert build_optimizer(model, fixed, 4).param_groups[0]["lr"] == pytest.approx(fixed.lr)
    everything = tiny_config(prepared, tmp_path, "train.decay_norm_and_bias=true").train
    opt = build_optimizer(model, everything, 1)
    assert all(g["weight_decay"] == everything.weight_decay for g in opt.param_groups)


def test_sampler_resumes_mid_epoch_and_shards_disjointly() -> None:
    data = list(range(23))
    full = ResumableSampler(data, seed=3)
    full.set_position(epoch=2)
    order = [i for _, i in full]
    assert sorted(order) == data and order != data  # a permutation, shuffled
    resumed = ResumableSampler(data, seed=3)
    resumed.set_position(epoch=2, start=8)
    assert len(resumed) == 15
    assert [(2, i) for i in order[8:]] == list(resumed)
    other = ResumableSampler(data, seed=3)
    other.set_position(epoch=3)
    assert [i for _, i in other] != order  # each epoch its own order
    shards = []
    for rank in range(2):
        s = ResumableSampler(data, num_replicas=2, rank=rank, seed=3)
        s.set_position(epoch=2)
        shards.append([i for _, i in s])
    assert len(shards[0]) == len(shards[1]) == 12  # padded to a multiple of the ranks
    assert set(shards[0]) | set(shards[1]) == set(data)


def test_seeded_items_reproducible_and_leave_global_rng_alone(prepared: Path) -> None:
    cfg = tiny_config(prepared, prepared / "unused")
    items = SeededItems(PolyDataset(prepared, "train", cfg.train.augment), seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a_img, a_tgt = items[(1, 4)]
    assert torch.equal(torch.get_rng_state(), before)  # the model's stream is untouched
    torch.manual_seed(999)
    b_img, b_tgt = items[(1, 4)]
    assert torch.equal(a_img, b_img) and torch.equal(a_tgt["polyboxes"], b_tgt["polyboxes"])
    # Another epoch draws other augmentations for the same image (at least once in 8).
    others = [items[(e, 4)][0] for e in range(2, 10)]
    assert any(o.shape != a_img.shape or not torch.equal(o, a_img) for o in others)


def test_batches_do_not_depend_on_worker_processes(prepared: Path) -> None:
    import polydet.train.engine as engine

    tc = tiny_config(prepared, prepared / "unused").train
    dataset = PolyDataset(prepared, "train", tc.augment)
    batches = []
    for workers in (0, 2):
        sampler = ResumableSampler(dataset, seed=0)
        sampler.set_position(epoch=1, start=2)
        loader = engine._loader(dataset, sampler, tc, torch.device("cpu"), workers)
        batches.append([(images, [t["image_id"] for t in targets]) for images, targets in loader])
    (a, b) = batches
    assert [ids for _, ids in a] == [ids for _, ids in b] and len(a) == 4
    for (ia, _), (ib, _) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ia, ib))


def test_train_config_rejects_out_of_range_values(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.batch_size"):
        tiny_config(prepared, tmp_path, "train.batch_size=0")
    with pytest.raises(ConfigError, match="train.log_every"):
        tiny_config(prepared, tmp_path, "train.log_every=0")


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    # The legacy global NumPy generator is the one checkpoints must capture.
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002
    torch.manual_seed(1)
    np.random.normal()  # noqa: NPY002 - leaves a cached Gaussian in NumPy's state
    state = capture_rng_state()
    expected = (random.random(), np.random.normal(), torch.rand(3))  # noqa: NPY002
    path = save_checkpoint({"rng": [state]}, tmp_path / "c.pt")
    loaded = load_checkpoint(path)  # weights_only=True inside
    random.seed(7)
    np.random.seed(7)  # noqa: NPY002
    torch.manual_seed(7)
    restore_rng_state(loaded["rng"][0])
    got = (random.random(), np.random.normal(), torch.rand(3))  # noqa: NPY002
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed away


def test_load_checkpoint_names_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not a polydet training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# --- training runs ---------------------------------------------------------------------------


class Crash(Exception):
    """Stands for a killed process right after a checkpoint was written."""


def weights_digest(model_file: Path) -> str:
    """The digest ``weights_sha256`` documents (SHA-256 over the state dict's entries sorted by
    name: ``name:dtype:shape``, then the raw bytes), computed here from the model file."""
    h = hashlib.sha256()
    for name, t in sorted(torch.load(model_file, weights_only=True)["state_dict"].items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_train_writes_outputs_and_resume_is_bit_exact(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10 train images, batch 2: 5 steps per epoch, 10 steps; checkpoints at 3, 6, 9, 10.
    straight = train(tiny_config(prepared, tmp_path / "straight"))
    out = tmp_path / "straight"
    assert straight["steps"] == 10 and straight["images_seen"] == 20
    assert straight["device"] == "cpu" and straight["precision"] == "fp32"
    assert straight["world_size"] == 1
    assert set(straight["final_losses"]["train"]) == {"loss", *LOSS_TERMS}
    assert all(math.isfinite(v) for v in straight["final_losses"]["val"].values())
    assert json.loads((out / "summary.json").read_text()) == straight
    with (out / "history.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == HISTORY_COLUMNS
    assert [(r["step"], r["split"]) for r in rows if r["split"] == "val"] == [
        ("5", "val"), ("10", "val"),
    ]  # fmt: skip
    assert [r["step"] for r in rows if r["split"] == "train"] == ["2", "4", "5", "6", "8", "10"]
    assert all(float(r["images_per_s"]) > 0 for r in rows if r["split"] == "train")
    model = load_model(out / "model.pt")
    assert isinstance(model, PolyDetector) and model.classes == CLASSES
    assert straight["weights_sha256"] == [weights_digest(out / "model.pt")]
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["step"] == 10 and last["config"]["train"]["out"] == str(out)

    # The same run killed after its step-3 checkpoint (mid-epoch), then resumed.
    import polydet.train.engine as engine

    real_save = engine.save_checkpoint

    def save_then_crash(state: dict, path: Path) -> Path:
        real_save(state, path)
        raise Crash(f"killed after step {state['step']}")

    monkeypatch.setattr(engine, "save_checkpoint", save_then_crash)
    cfg = tiny_config(prepared, tmp_path / "resumed")
    with pytest.raises(Crash, match="step 3"):
        train(cfg)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 3
    resumed = train(cfg, resume="last")

    assert resumed["steps"] == 10 and resumed["images_seen"] == 20
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    assert_same_state(state_of(out / "model.pt"), state_of(tmp_path / "resumed" / "model.pt"))
    with (tmp_path / "resumed" / "history.csv").open(newline="") as f:
        again = list(csv.DictReader(f))
    # Same rows, same numbers (only the measured throughput may differ).
    assert [{**r, "images_per_s": ""} for r in again] == [{**r, "images_per_s": ""} for r in rows]


def test_resume_refuses_a_different_model(prepared: Path, tmp_path: Path) -> None:
    cfg = tiny_config(prepared, tmp_path, "train.max_steps=1", "train.amp=true")
    summary = train(cfg)
    # On a CPU, train.amp means bfloat16 where oneDNN has fast kernels for it, else float32.
    dtype = autocast_dtype(cfg.train, torch.device("cpu"))
    assert summary["precision"] == ("bf16-mixed" if dtype == torch.bfloat16 else "fp32")
    assert dtype in (torch.bfloat16, None)
    other = tiny_config(prepared, tmp_path, "train.max_steps=1", "model.fpn_channels=8")
    with pytest.raises(ConfigError, match="model.fpn_channels"):
        train(other, resume="last")


def test_nonfinite_loss_stops_with_report_and_intact_checkpoint(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_loss = PolyDetector.loss
    calls = {"train": 0}

    def loss_nan_at_step_4(self: PolyDetector, images: list, targets: list) -> dict:
        losses = real_loss(self, images, targets)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 4:
                losses["loss_polybox"] = losses["loss_polybox"] * float("nan")
        return losses

    monkeypatch.setattr(PolyDetector, "loss", loss_nan_at_step_4)
    cfg = tiny_config(prepared, tmp_path, "train.checkpoint_every=2")
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*loss_polybox"):
        train(cfg)

    report = json.loads((tmp_path / "nonfinite.json").read_text())
    assert report["step"] == 4 and report["nonfinite_terms"] == ["loss_polybox"]
    assert len(report["image_ids"]) == 2
    assert all(i.startswith("im") for i in report["image_ids"])
    assert report["last_checkpoint_step"] == 2
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model.pt").exists()

    # The intact checkpoint resumes (here with the fault gone) to the end of the run.
    monkeypatch.setattr(PolyDetector, "loss", real_loss)
    done = train(cfg, resume=str(tmp_path / "checkpoints" / "last.pt"))
    assert done["steps"] == 10 and not (tmp_path / "nonfinite.json").exists()


WORKER = """
import os, sys
from pathlib import Path
# Each rank works in its own directory, so that the files each one writes can be told apart.
os.chdir(Path(sys.argv[1]) / f"rank{os.environ['RANK']}")
from polydet.cli import main  # as `torchrun -m polydet.cli train ARGS` runs it
sys.exit(main(["train", *sys.argv[2:]]))
"""


def test_ddp_two_cpu_processes_with_gloo(prepared: Path, tmp_path: Path) -> None:
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    # A relative train.out: rank r would write under rank{r}/.
    args = [f"--params={ROOT / 'params.yaml'}"]
    for item in tiny_overrides(prepared, Path("out"), "train.max_steps=3"):
        args.append(f"--set={item}")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(tmp_path / "worker.py"), str(tmp_path), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = tmp_path / "rank0" / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["images_seen"] == 10  # one epoch: 5 images per rank in batches 2, 2, 1
    a, b = summary["weights_sha256"]
    assert a == b  # both ranks end with bit-identical weights
    assert a == weights_digest(out / "model.pt")
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "history.csv").is_file()
    assert list((tmp_path / "rank1").iterdir()) == []  # rank 1 wrote nothing
    assert proc.stdout.count('"world_size": 2') == 1  # one summary printed, by rank 0


def test_split_history_writes_one_file_per_split(tmp_path: Path):
    from polydet.train.engine import HISTORY_COLUMNS, split_history

    rows = [
        {"step": 1, "epoch": 1, "split": "train", "loss": 3.0},
        {"step": 2, "epoch": 1, "split": "train", "loss": 2.0},
        {"step": 2, "epoch": 1, "split": "val", "loss": 2.5},
        {"step": 3, "epoch": 2, "split": "train", "loss": 1.5},
    ]
    with (tmp_path / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    split_history(tmp_path / "history.csv")
    for split in ("train", "val"):
        with (tmp_path / f"history_{split}.csv").open(newline="") as f:
            got = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
        assert got == [(r["step"], r["loss"]) for r in rows if r["split"] == split]


def test_moving_average_is_the_saved_model_and_resumes_exactly(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ema = ("train.ema_decay=0.9", "train.max_steps=6")
    straight = train(tiny_config(prepared, tmp_path / "straight", *ema))
    out = tmp_path / "straight"
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["ema"]["updates"] == 6
    saved = state_of(out / "model.pt")
    # The model file holds the average, not the optimizer's last weights.
    assert_same_state(saved, last["ema"]["shadow"])
    assert any(not torch.equal(saved[k], last["model"][k]) for k in saved)
    assert straight["weights_sha256"] == [weights_digest(out / "model.pt")]

    import polydet.train.engine as engine

    real_save = engine.save_checkpoint

    def save_then_crash(state: dict, path: Path) -> Path:
        real_save(state, path)
        raise Crash(f"killed after step {state['step']}")

    monkeypatch.setattr(engine, "save_checkpoint", save_then_crash)
    cfg = tiny_config(prepared, tmp_path / "resumed", *ema)
    with pytest.raises(Crash, match="step 3"):
        train(cfg)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    train(cfg, resume="last")
    assert_same_state(saved, state_of(tmp_path / "resumed" / "model.pt"))
