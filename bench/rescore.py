"""Re-score trained models under other inference settings, without retraining.

The inference keys of a model file's ``model.roi`` section (``refine_steps``,
``refine_candidates``, ``vote_iou``, ``nms_thresh``, ``score_thresh``, ...) travel with the
model, so ``polydet evaluate --model`` always uses the ones it was saved with. This copies
each ``--model`` with each ``--variant``'s keys replaced (``--out/<variant>/<i>.pt``),
evaluates the copies one after the other on the project's split (``params.yaml`` in the
working directory: the prepared data and the ``evaluate`` section; ``polydet evaluate``
holds the project's lock, so they cannot run side by side), and prints one Markdown table:
a row per variant, AP75 per model, then the means of AP75, recall at IoU 0.75 (its ceiling),
AP50 and AP50:95. A variant
``NAME:`` with no keys is the model as saved.

    .venv/bin/python bench/rescore.py --model runs/s0/model.pt --model runs/s1/model.pt \\
        --variant "as saved:" --variant "no vote:vote_iou=0.0" [--out outputs/rescore]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    keys = dict(item.split("=", 1) for item in spec.split(",") if item.strip())
    return name.strip(), {k.strip(): v.strip() for k, v in keys.items()}


def with_keys(src: Path, dst: Path, keys: dict[str, str]) -> None:
    """``src`` copied to ``dst`` with ``model.roi`` keys replaced (typed like the defaults of
    ``polydet.core.config``: a value with a dot is a float, else an int)."""
    payload = torch.load(src, map_location="cpu", weights_only=True)
    for key, value in keys.items():
        payload["model"]["roi"][key] = float(value) if "." in value else int(value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, dst)


def evaluate(model: Path, out: Path, params: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "polydet.cli", "evaluate", "--params", params,
           "--model", str(model), "--set", f"evaluate.out={out}"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, type=Path)
    parser.add_argument("--variant", action="append", required=True, type=parse_variant)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="outputs/rescore", type=Path)
    args = parser.parse_args()
    jobs = []
    for v, (name, keys) in enumerate(args.variant):
        for i, src in enumerate(args.model):
            dst = args.out / f"v{v}" / f"{i}.pt"
            with_keys(src, dst, keys)
            jobs.append((name, i, dst, args.out / f"v{v}" / f"eval{i}"))
    results = [evaluate(dst, out, args.params) for _, _, dst, out in jobs]
    table: dict[str, list[dict[str, float]]] = {}
    for (name, _, _, _), metrics in zip(jobs, results):
        table.setdefault(name, []).append(metrics)
    heads = [f"AP75 model {i}" for i in range(len(args.model))]
    print(
        "| inference | " + " | ".join(heads)
        + " | mean AP75 | mean recall at 0.75 | mean AP50 | mean AP50:95 |"
    )  # fmt: skip
    print("| --- " * (len(heads) + 5) + "|")
    keys = ("map75", "recall75", "map50", "map50_95")
    for name, rows in table.items():
        cells = [f"{r['map75']:.3f}" for r in rows]
        means = [statistics.mean(r[k] for r in rows) for k in keys]
        print(
            f"| {name} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(f"{m:.3f}" for m in means)
            + " |"
        )


if __name__ == "__main__":
    main()
