"""Train and evaluate several configurations; print AP50 / AP75 (and by orientation) side by side.

Each run is ``polydet train`` then ``polydet evaluate`` with its ``--set`` overrides (plus
``train.amp=false`` and ``train.checkpoint_every=0``), written to ``OUT/<name>/``; runs go
``--jobs`` at a time with one thread each (2 on this machine's 2 cores), each in its own
working directory ``OUT/<name>/work`` (the project lock is per directory) that links the
project's ``params.yaml``, ``data/`` and prepared data and anchors. ``--collect`` only
reads finished runs and prints the table: it is how the README's table was made.

    .venv/bin/python bench/sweep.py --out outputs/sweep [--jobs 2] \\
        --run "canonical: model.rpn.order_free=false model.roi.order_free=false" \\
        --run "order-free:"
    .venv/bin/python bench/sweep.py --out outputs/sweep --collect
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

COLUMNS = (
    ("AP50", "map50"),
    ("AP75", "map75"),
    ("AP50:95", "map50_95"),
    ("AP75 near 45°", "map75/orient_diagonal"),
    ("AP75 oblique", "map75/orient_oblique"),
    ("AP75 axis-aligned", "map75/orient_axis"),
    ("heading ≤45°", "heading_acc45"),
    ("heading ≤10°", "heading_acc10"),
)


def run_one(out: Path, name: str, overrides: list[str], params: str) -> None:
    """Train then evaluate one configuration into ``out/name`` (logs beside it)."""
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    sets = [*overrides, "train.amp=false", "train.checkpoint_every=0"]
    (run / "args").write_text(" ".join(overrides) + "\n")
    polydet = str(Path(sys.executable).with_name("polydet"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = run.resolve()
    train = [polydet, "train", "--params", params, "--set", f"train.out={run / 'train'}"]
    evaluate = [polydet, "evaluate", "--params", params, "--model", str(run / "train/model.pt")]
    evaluate += ["--set", f"evaluate.out={run / 'eval'}"]
    for item in sets:
        train += ["--set", item]
        evaluate += ["--set", item]
    # Each run works in its own directory (the project lock is per directory), reading the
    # project's prepared data and anchors through links.
    work = run / "work"
    (work / "outputs").mkdir(parents=True, exist_ok=True)
    for link, target in (
        (work / "outputs/prepared", Path("outputs/prepared")),
        (work / "outputs/anchors", Path("outputs/anchors")),
        (work / Path(params).name, Path(params)),
        (work / "data", Path("data")),
    ):
        if not link.is_symlink():
            link.symlink_to(target.resolve())
    train[3] = evaluate[3] = Path(params).name
    start = time.perf_counter()
    with (run / "train.log").open("w") as log:
        subprocess.run(train, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    (run / "train_s").write_text(f"{time.perf_counter() - start:.0f}\n")
    with (run / "eval.log").open("w") as log:
        subprocess.run(
            evaluate, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work
        )


def table(out: Path) -> str:
    """Markdown table of every finished run under ``out`` (name order)."""
    head = "| run | steps | " + " | ".join(c for c, _ in COLUMNS) + " | settings |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 3)]
    for run in sorted(p for p in out.iterdir() if (p / "eval/metrics.json").is_file()):
        m = json.loads((run / "eval/metrics.json").read_text())
        steps = json.loads((run / "train/summary.json").read_text())["steps"]
        cells = " | ".join("-" if m.get(k) is None else f"{m[k]:.3f}" for _, k in COLUMNS)
        args = (run / "args").read_text().strip() if (run / "args").is_file() else ""
        args = args.replace("--set ", "")
        lines.append(f"| {run.name} | {steps} | {cells} | `{args or 'params.yaml'}` |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/sweep")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--run", action="append", default=[], metavar="NAME: KEY=VALUE ...")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--collect", action="store_true", help="only print the table")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.collect:
        runs = []
        for spec in args.run:
            name, _, rest = spec.partition(":")
            runs.append((name.strip(), rest.split()))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for f in [pool.submit(run_one, out, n, o, args.params) for n, o in runs]:
                f.result()
    print(table(out))


if __name__ == "__main__":
    main()
