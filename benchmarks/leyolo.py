"""LeYOLO CPU latency, side by side in one run: Nano, Small and Medium at 320 and 640 (fully fused, batch 1), and,
when `ultralytics` is importable, YOLOv8n and YOLO11n built from their YAMLs (fused by Ultralytics) as references.
Ultralytics (and `ultralytics-thop` for its GFLOPs) is a benchmark-only extra, never a dependency of peft-ext;
without it those rows are skipped.

Every model gets one warm-up forward per size, then --repeats timed forwards; the models take turns within each
repeat so machine drift hits them alike. Reported: median milliseconds, the ratio to LeYOLO-Nano at the same size,
parameters and GFLOPs (LeYOLO by the official count, `count_gflops` on the Ultralytics-fused model; YOLO by
Ultralytics' own `get_flops`). On CPU, latency follows memory traffic and kernel efficiency more than FLOPs:
depthwise convolutions do little arithmetic per byte, so fewer FLOPs need not mean faster.

    OMP_NUM_THREADS=2 flock /tmp/peft-ext-heavy.lock python benchmarks/leyolo.py [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import tempfile
import time

import torch

from peft_ext.models.leyolo import LeYoloConfig, LeYoloForObjectDetection
from peft_ext.models.leyolo.modeling_leyolo import count_gflops


def leyolo_models():
    models = {}
    for variant in ("nano", "small", "medium"):
        model = LeYoloForObjectDetection(LeYoloConfig.from_variant(variant)).eval()
        parameters = model.num_parameters()  # before fusing, as the table of the paper counts them
        gflops = {size: count_gflops(model.fuse("ultralytics"), size) for size in (320, 640)}
        models[f"LeYOLO-{variant}"] = (model.fuse(), parameters, gflops)
    return models


def ultralytics_models():
    """YOLOv8n and YOLO11n from Ultralytics' YAMLs, or {} (with the reason printed) when it cannot be imported."""
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    real_version = importlib.metadata.version
    # Ultralytics reads torchvision's version at import time only to pick code paths; the model builders used
    # here do not need torchvision, which has no wheel for this CPU torch. The shim lives in this process only.
    importlib.metadata.version = lambda name: "0.0.0" if name == "torchvision" else real_version(name)
    try:
        from ultralytics.nn.tasks import DetectionModel
        from ultralytics.utils.torch_utils import get_flops
    except ImportError as error:
        print(f"ultralytics not importable ({error}); YOLOv8n / YOLO11n rows skipped.\n")
        return {}
    finally:
        importlib.metadata.version = real_version
    models = {}
    for name, yaml in (("YOLOv8n", "yolov8n.yaml"), ("YOLO11n", "yolo11n.yaml")):
        model = DetectionModel(yaml, verbose=False).eval()
        parameters = sum(p.numel() for p in model.parameters())
        model = model.fuse(verbose=False)
        models[name] = (model, parameters, {size: get_flops(model, size) for size in (320, 640)})
    return models


@torch.inference_mode()
def measure(models, size, repeats):
    pixel_values = torch.rand(1, 3, size, size)
    for model, *_ in models.values():
        model(pixel_values)  # warm-up
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, (model, *_) in models.items():
            start = time.perf_counter()
            model(pixel_values)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(samples) for name, samples in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {**leyolo_models(), **ultralytics_models()}
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, median of {args.repeats} forwards\n")
    print("| model | params | size | GFLOPs | median ms | ms / LeYOLO-nano | GFLOPs / LeYOLO-nano |")
    print("|---|---|---|---|---|---|---|")
    for size in (320, 640):
        latency = measure(models, size, args.repeats)
        reference_ms, reference_gflops = latency["LeYOLO-nano"], models["LeYOLO-nano"][2][size]
        for name, (_, parameters, gflops) in models.items():
            print(f"| {name} | {parameters:,} | {size} | {gflops[size]:.3f} | {latency[name]:.1f} | "
                  f"{latency[name] / reference_ms:.2f} | {gflops[size] / reference_gflops:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
