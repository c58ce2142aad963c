"""Learning curve of one training run: test AP50 / AP75 against images seen.

Trains once with ``train.snapshot_every`` set (a model file every N steps, same schedule as
without it), then evaluates every snapshot and the final model on ``evaluate.split`` with
``polydet evaluate``'s own code (with the configured test-time augmentation, and without it:
the model alone, as its ONNX export runs). Prints a Markdown table and writes ``curve.csv`` and
``curve.json`` beside the snapshots. It also prints the CPU it ran on (model name, ATen's
instruction set, and whether AVX-512 is present), the training wall time and steps/s.

    .venv/bin/python bench/learning_curve.py [--params params.yaml] [--every 100]
        [--out outputs/curve] [--set train.amp=false ...]

To approximate the slowest CPU of this machine kind (AVX2, no AVX-512) on a faster one:
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ... --set train.amp=false``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from polydet.core.config import load_config
from polydet.eval.evaluate import evaluate_model


def cpu_description() -> dict[str, str]:
    """What the figures were measured on: CPU model, ISA in use, AVX-512 presence."""
    model, flags = platform.processor() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "avx512f": str("avx512f" in flags.split()),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--every", type=int, default=100, help="steps between snapshots")
    parser.add_argument("--out", default="outputs/curve", help="train.out of the run")
    args = parser.parse_args()
    out = Path(args.out)
    overrides = [*args.set, f"train.out={out}", f"train.snapshot_every={args.every}"]
    cfg = load_config(args.params, overrides)
    polydet = Path(sys.executable).with_name("polydet")
    cmd = [str(polydet), "train", "--params", args.params]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())

    models = sorted((out / "snapshots").glob("step_*.pt"))
    steps = [int(p.stem.split("_")[1]) for p in models]
    if not steps or steps[-1] != summary["steps"]:
        models.append(out / "model.pt")
        steps.append(int(summary["steps"]))
    rows = []
    ecfg = load_config(args.params, [*overrides, f"evaluate.out={out / 'curve_eval'}"])
    # The model alone too (what its ONNX export runs), when evaluation has test-time views.
    alone = load_config(
        args.params,
        [*overrides, f"evaluate.out={out / 'curve_eval_alone'}", "evaluate.tta.enabled=false"],
    )
    for step, path in zip(steps, models):
        m = evaluate_model(ecfg, str(path))
        m0 = evaluate_model(alone, str(path)) if ecfg.evaluate.tta.enabled else m
        rows.append(
            {
                "step": step,
                "images_seen": step * cfg.train.batch_size,
                "map50": m.get("map50"),
                "map75": m.get("map75"),
                "map50_95": m.get("map50_95"),
                "recall75": m.get("recall75"),
                **{f"map75/orient_{k}": m.get(f"map75/orient_{k}") for k in ("diagonal", "axis")},
                "map75_model_alone": m0.get("map75"),
            }
        )
    with (out / "curve.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = {
        **cpu_description(),
        "threads": torch.get_num_threads(),
        "train_wall_s": round(wall, 1),
        "train_s": summary.get("wall_time_s"),
        "steps": summary["steps"],
        "steps_per_s": round(summary["steps"] / max(1e-9, summary.get("wall_time_s") or wall), 3),
        "precision": summary.get("precision"),
        "curve": rows,
    }
    (out / "curve.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))
    print(
        "\n| images seen | step | AP50 | AP75 | AP50:95 | recall at 0.75 | AP75 near 45° "
        "| AP75 axis-aligned | AP75 of the model alone |"
    )
    print("| --- " * 9 + "|")
    keys = ("map50", "map75", "map50_95", "recall75", "map75/orient_diagonal")
    for r in rows:
        vals = [r[k] for k in (*keys, "map75/orient_axis", "map75_model_alone")]
        cells = " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
        print(f"| {r['images_seen']} | {r['step']} | {cells} |")


if __name__ == "__main__":
    main()
