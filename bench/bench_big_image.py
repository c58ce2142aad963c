"""Benchmark: peak memory of ``polydet predict`` on one synthetic 10,000 x 10,000 image.

Writes the image (a gradient with 3,000 filled quads; PNG or JPEG) under ``--tmp``, then
runs ``polydet predict`` on it in a child process with tiling on (``data.tile`` 1024 / 200:
144 tiles) and prints the child's peak resident set size (``resource.getrusage``) and CPU
time. Run: ``.venv/bin/python bench/bench_big_image.py --model outputs/train/model.pt
[--format jpg] [--size 10000]``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


def make_image(path: Path, n: int, seed: int = 0) -> Path:
    """A ``n`` x ``n`` RGB image: a smooth gradient with filled quadrilaterals drawn on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n:50, 0:n:50]
    small = np.stack([(x * 7 + y * 3) % 256, (x * 2 + y * 5) % 256, (x + y) % 256], -1)
    im = Image.fromarray(small.astype(np.uint8)).resize((n, n), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    for _ in range(3 * n * n // 100_000):
        cx, cy = rng.uniform(0, n, 2)
        w, h = rng.uniform(20, 90, 2)
        c, s = np.cos(a := rng.uniform(0, np.pi)), np.sin(a)
        half = [(-w, -h), (w, -h), (w, h), (-w, h)]
        draw.polygon([(cx + c * u - s * v, cy + s * u + c * v) for u, v in half],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))  # fmt: skip
    im.save(path, quality=90) if path.suffix == ".jpg" else im.save(path, compress_level=1)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--format", choices=["png", "jpg"], default="png")
    p.add_argument("--size", type=int, default=10_000)
    p.add_argument("--tmp", default="/tmp/polydet_bench_big")
    args = p.parse_args()
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    image = make_image(tmp / f"big.{args.format}", args.size)
    cmd = [sys.executable, "-m", "polydet.cli", "predict", str(image), "--model", args.model,
           "--out", str(tmp / "predict"), "--set", "data.tile.enabled=true"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"peak RSS {usage.ru_maxrss / 1e6:.2f} GB, CPU {usage.ru_utime + usage.ru_stime:.0f} s")


if __name__ == "__main__":
    main()
