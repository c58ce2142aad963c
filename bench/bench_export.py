"""Inference speed of one model in eager PyTorch, TorchScript and ONNX Runtime, on the CPU.

The model (``--model`` file, else ``params.yaml``'s ``model`` section from scratch: untrained
scores are near-uniform, so every candidate reaches both NMS stages, the worst case) is
exported to both formats with :func:`polydet.deploy.export.export_model` (including its parity
check), then each runtime predicts the same batch of smooth random images at each image size
(``--sizes``: the demo's 256 px and 1024 px by default; the model resizes inside) and each
batch size (``--batches``). Runs alternate between the runtimes so that load from other
processes hits them alike; the median of ``--iters`` runs is reported as latency per image
(ms) and images per second, in wall time and in process CPU time (all threads; steadier
when other processes load the machine). Eager is ``PolyDetector.predict`` on a list of images (resize
and batching included), the exports take the ``[B, 3, H, W]`` tensor.

    .venv/bin/python bench/bench_export.py [--params params.yaml] [--model FILE]
        [--sizes 256 1024] [--batches 1 8] [--iters 5] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from polydet.core.config import load_config
from polydet.deploy.export import OnnxDetector, export_model, sample_images
from polydet.model import build_model, load_model


def images_of(size: int, batch: int) -> list[torch.Tensor]:
    base = sample_images()[0][None]  # 256 x 256, smooth
    img = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")[0]
    return [img.roll(17 * i, dims=-1) for i in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", help="a saved model file (default: untrained, from params)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    cfg = load_config(args.params, args.set)
    torch.manual_seed(0)
    if args.model:
        model = load_model(args.model)
        classes = list(model.classes or cfg.data.classes)
    else:
        model = build_model(cfg.model)
        classes = list(cfg.data.classes)
    model.eval()
    out = Path(tempfile.mkdtemp(prefix="bench-export-"))
    check = [images_of(256, 1)[0]]
    started = time.perf_counter()
    export_model(model, out / "onnx", "onnx", classes, check_images=check)
    export_model(model, out / "ts", "torchscript", classes, check_images=check)
    export_seconds = time.perf_counter() - started
    onnx = OnnxDetector(out / "onnx")
    ts = torch.jit.load(str(out / "ts" / "model.ts"))

    runners: dict[str, Callable[[list[torch.Tensor]], object]] = {
        "eager": lambda ims: model.predict(ims),
        "torchscript": lambda ims: ts(torch.stack(ims)),
        "onnxruntime": lambda ims: onnx.run(torch.stack(ims).numpy()),
    }
    rows = []
    with torch.inference_mode():
        for size in args.sizes:
            for batch in args.batches:
                ims = images_of(size, batch)
                times: dict[str, list[float]] = {k: [] for k in runners}
                cpu: dict[str, list[float]] = {k: [] for k in runners}
                for _ in range(2):  # warm-up (TorchScript optimises on its second call)
                    for run in runners.values():
                        run(ims)
                for _ in range(args.iters):
                    for name, run in runners.items():
                        t, c = time.perf_counter(), time.process_time()
                        run(ims)
                        times[name].append(time.perf_counter() - t)
                        cpu[name].append(time.process_time() - c)
                med = {k: statistics.median(v) for k, v in times.items()}
                med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
                for name, seconds in med.items():
                    rows.append({
                        "size": size, "batch": batch, "runtime": name,
                        "ms_per_image": round(1000 * seconds / batch, 1),
                        "images_per_s": round(batch / seconds, 2),
                        "speedup_vs_eager": round(med["eager"] / seconds, 2),
                        "cpu_ms_per_image": round(1000 * med_cpu[name] / batch, 1),
                        "cpu_speedup_vs_eager": round(med_cpu["eager"] / med_cpu[name], 2),
                    })  # fmt: skip
    print(json.dumps({
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "model": args.model or f"untrained {cfg.model.backbone}, {cfg.model.min_size} px",
        "export_seconds": round(export_seconds, 1),
        "iters": args.iters,
    }, indent=1))  # fmt: skip
    print(
        "| size | batch | runtime | ms/image | images/s | x eager | CPU ms/image | x eager (CPU) |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['size']} | {r['batch']} | {r['runtime']} | {r['ms_per_image']} | "
            f"{r['images_per_s']} | {r['speedup_vs_eager']} | {r['cpu_ms_per_image']} | "
            f"{r['cpu_speedup_vs_eager']} |"
        )


if __name__ == "__main__":
    main()
