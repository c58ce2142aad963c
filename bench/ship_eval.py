"""The precision of what ships: trained models exported to ONNX and measured on ONNX Runtime,
beside the eager model with the test-time 45-degree view, one row per model and the mean.

For each ``--model`` file: ``polydet export --format onnx`` (with its parity check), then
``polydet evaluate --runtime onnx`` on the export (the model alone: what ``--runtime onnx``,
the registered model's default runtime and every deployment serve) and, with ``--tta``, the
eager model with the ``evaluate.tta`` views of ``--params`` switched on. Prints one Markdown
table: the kit's AP at IoU 0.5 and 0.75 (VOC07 11-point, polygon IoU) overall and by class,
the share of objects found at IoU >= 0.75 (score >= evaluate.score_thresh) by orientation, and
the heading within 45 degrees by class. Runs one at a time (``polydet`` holds the project's lock).

    .venv/bin/python bench/ship_eval.py --model runs/s0/model.pt --model runs/s1/model.pt \\
        [--tta] [--out outputs/ship_eval]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

COLUMNS = (
    ("AP50", "map50"),
    ("AP75", "dota_map75"),
    ("AP75 card", "dota_ap75/card"),
    ("AP75 plate", "dota_ap75/plate"),
    ("AP75 kite", "dota_ap75/kite"),
    ("found75 near 45°", "found75/orient_diagonal"),
    ("found75 oblique", "found75/orient_oblique"),
    ("found75 axis", "found75/orient_axis"),
    ("heading card", "heading_acc45/card"),
    ("heading plate", "heading_acc45/plate"),
    ("heading kite", "heading_acc45/kite"),
)


def polydet(*args: str) -> None:
    cmd = [sys.executable, "-m", "polydet.cli", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def row(name: str, m: dict) -> str:
    cells = " | ".join("-" if m.get(k) is None else f"{m[k]:.3f}" for _, k in COLUMNS)
    return f"| {name} | {cells} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, type=Path)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tta", action="store_true", help="also the eager model + its views")
    parser.add_argument("--out", default="outputs/ship_eval", type=Path)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"ONNX Runtime (model alone)": []}
    if args.tta:
        runs["eager + 45° view"] = []
    for i, model in enumerate(args.model):
        out = args.out / f"model{i}"
        polydet("export", "--params", args.params, "--model", str(model), "--format", "onnx",
                "--out", str(out / "onnx"))  # fmt: skip
        polydet("evaluate", "--params", args.params, "--model", str(out / "onnx"),
                "--runtime", "onnx", "--set", "evaluate.tta.enabled=false",
                "--set", f"evaluate.out={out / 'eval_onnx'}")  # fmt: skip
        metrics = json.loads((out / "eval_onnx" / "metrics.json").read_text())
        runs["ONNX Runtime (model alone)"].append(metrics)
        if args.tta:
            polydet("evaluate", "--params", args.params, "--model", str(model),
                    "--set", "evaluate.tta.enabled=true",
                    "--set", f"evaluate.out={out / 'eval_tta'}")  # fmt: skip
            runs["eager + 45° view"].append(json.loads((out / "eval_tta/metrics.json").read_text()))
    print("| run | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|" + " --- |" * (len(COLUMNS) + 1))
    for name, found in runs.items():
        for model, m in zip(args.model, found):
            print(row(f"{name}: {model}", m))
        if len(found) > 1:
            mean = {
                k: statistics.mean(m[k] for m in found if m.get(k) is not None)
                for _, k in COLUMNS
                if any(m.get(k) is not None for m in found)
            }
            print(row(f"**{name}: mean of {len(found)}**", mean))


if __name__ == "__main__":
    main()
