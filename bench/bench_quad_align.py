"""Quad-aligned RoI pooling against torchvision's MultiScaleRoIAlign on the same RoIs (CPU).

The default training batch (160 px input, 4 images; FPN levels of 20², 10², 5² cells, 128
channels) and 384 RoIs of the sizes the first stage samples. torchvision pools each RoI's
box; :func:`polydet.model.quad_align.quad_roi_align` pools the same box given as a quad
(axis-aligned, so both compute the same numbers, checked here) and the same RoIs turned by
30 degrees about their centres (the quads it meets). Forward alone (inference) and forward +
backward (training), sampling ratio 1 as the default, CPU time per call (median of
interleaved repeats), one thread, and the ratio:

    .venv/bin/python bench/bench_quad_align.py [--repeats 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torchvision.ops import MultiScaleRoIAlign

from polydet.model.quad_align import QuadRoIPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"ATen CPU capability: {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s)"
    )
    g = torch.Generator().manual_seed(0)
    batch, channels, num = 4, 128, 384
    feats = {
        str(i): torch.randn(batch, channels, side, side, generator=g, requires_grad=True)
        for i, side in enumerate((20, 10, 5))
    }
    xy = torch.rand(num, 2, generator=g) * 110
    wh = torch.rand(num, 2, generator=g) * 60 + 8
    boxes = torch.cat([xy, xy + wh], 1)
    image = torch.randint(0, batch, (num,), generator=g)
    per_image = [boxes[image == b] for b in range(batch)]
    order = torch.cat([torch.where(image == b)[0] for b in range(batch)])
    x1, y1, x2, y2 = boxes.unbind(1)
    rect = torch.stack([torch.stack(p, -1) for p in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))], 1)
    centre = rect.mean(1, keepdim=True)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    turned = (rect - centre) @ torch.tensor([[c, s], [-s, c]]) + centre
    tv = MultiScaleRoIAlign(["0", "1", "2"], 7, 1)
    quad = QuadRoIPool(["0", "1", "2"], 7, 1)
    sizes = [(160, 160)] * batch

    def run_tv() -> torch.Tensor:
        return tv(feats, per_image, sizes)

    def run_quad(corners: torch.Tensor) -> torch.Tensor:
        return quad(feats, image[order], corners[order], (160, 160))

    same = (run_quad(rect) - run_tv()).abs().max().item()
    print(f"max |quad - torchvision| on the axis-aligned quads: {same:.2e}")
    kernels = {
        "MultiScaleRoIAlign": run_tv,
        "quad (axis-aligned)": lambda: run_quad(rect),
        "quad (turned 30°)": lambda: run_quad(turned),
    }
    print("| pass | " + " | ".join(f"{k} ms" for k in kernels) + " | ratio axis / turned |")
    print("|" + " --- |" * (len(kernels) + 2))
    for backward in (False, True):
        times: dict[str, list[float]] = {k: [] for k in kernels}
        for i in range(args.repeats + 1):
            for name, fn in kernels.items():
                start = time.process_time()
                if backward:
                    y = fn()
                    y.backward(torch.ones_like(y))
                else:
                    with torch.no_grad():
                        fn()
                if i:  # the first round warms up
                    times[name].append(time.process_time() - start)
                for f in feats.values():
                    f.grad = None
        ms = [statistics.median(times[k]) * 1000 for k in kernels]
        cells = " | ".join(f"{m:.1f}" for m in ms)
        label = "forward + backward" if backward else "forward"
        print(f"| {label} | {cells} | {ms[1] / ms[0]:.2f}× / {ms[2] / ms[0]:.2f}× |")


if __name__ == "__main__":
    main()
