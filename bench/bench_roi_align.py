"""RoIAlign forward + backward in training: polydet's separable kernel vs torchvision's.

Feature maps of the default training size (160 px input: strides 8/16/32 give 20², 10², 5²
cells, 128 channels, batch 4) and RoIs like the sampled ones (384 per batch at the finest
level). Prints CPU time per call (median of interleaved repeats) and the ratio, on one
thread, with ATen's instruction set:

    .venv/bin/python bench/bench_roi_align.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.ops import roi_align

from polydet.model.roi_align import roi_align_separable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"ATen CPU capability: {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s)"
    )
    g = torch.Generator().manual_seed(0)
    batch, channels = 4, 128
    print("| level (cells) | RoIs | torchvision ms | separable ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for side, num, stride in ((20, 384, 8), (10, 64, 16), (5, 32, 32)):
        x = torch.randn(batch, channels, side, side, generator=g, requires_grad=True)
        xy = torch.rand(num, 2, generator=g) * side * stride * 0.8
        wh = torch.rand(num, 2, generator=g) * 5 * stride + stride
        image = torch.randint(0, batch, (num, 1), generator=g).float()
        rois = torch.cat([image, xy, xy + wh], dim=1)
        kernels = {"torchvision": roi_align, "separable": roi_align_separable}
        times: dict[str, list[float]] = {k: [] for k in kernels}
        for i in range(args.repeats + 1):
            for name, fn in kernels.items():
                start = time.process_time()
                y = fn(x, rois, (7, 7), 1 / stride, 1)
                y.backward(torch.ones_like(y))
                if i:  # the first round warms up
                    times[name].append(time.process_time() - start)
                x.grad = None
        tv, sep = (statistics.median(times[k]) * 1000 for k in kernels)
        print(f"| {side}² | {num} | {tv:.1f} | {sep:.1f} | {sep / tv:.2f}× |")


if __name__ == "__main__":
    main()
