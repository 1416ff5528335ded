"""Benchmark (not a test): one attack step (forward + input gradient) in each numeric variant.

For an IT model (backbone cut at ``layer4.0`` + a 21-site readout, 224 px), times the work of
one attack step on a batch of random images, per image, in these variants (each a subset of
what ``closedloop.attacks.engine.make_run_settings`` can switch on):

- ``fp32``: the model as given, float32, contiguous (NCHW) images;
- ``+fold``: BatchNorm folded into the convolutions (``fold_batch_norm``);
- ``+CL``: model and images in channels-last memory format;
- ``bf16``: bf16 autocast of the forward pass.

Timed runs go round the variants in turn (the order rotating each repeat) so that all see the
same load on a shared machine; prints one JSON line per variant with the median time per image
and the median, min and max of the paired speed-up over ``fp32`` (same repeat), plus a header
line with the machine facts (bf16 support, threads, load average) and the folding error.
``resnet18`` is torchvision's (not a registered backbone of the project).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_precision.py --backbone resnet_tiny --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from closedloop.attacks.engine import fold_batch_norm, has_native_bf16
from closedloop.attacks.sites import SITE_TARGET

VARIANTS = ("fp32", "fp32+fold", "fp32+CL", "fp32+CL+fold", "bf16", "bf16+CL+fold")


def _make_model(backbone: str):
    from models import ITModel, make_it_model
    from models.networks import make_backbone
    from models.readout import FactorizedReadout

    if backbone != "resnet18":
        return make_it_model(backbone, "layer4.0", 21)
    from torchvision.models import resnet18

    generator = torch.Generator().manual_seed(0)
    network = resnet18()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
    cut = make_backbone(network, source="resnet18", architecture="resnet18", layer="layer4.0").eval()
    return ITModel(cut, FactorizedReadout(21, cut.out_shape(224))).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet_tiny", help="resnet_tiny, resnet18 or resnet50")
    parser.add_argument("--batch", type=int, default=16, help="images per batch")
    parser.add_argument("--steps", type=int, default=2, help="attack steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    args = parser.parse_args()
    wanted = args.variants.split(",")
    model = _make_model(args.backbone).requires_grad_(False)
    images = torch.rand(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    folded = fold_batch_norm(model, images[:2])
    rows, site = torch.arange(args.batch), torch.arange(args.batch) % 21

    def step(network, bf16: bool, channels_last: bool) -> float:
        network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        start = time.perf_counter()
        for _ in range(args.steps):
            x = x.detach().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                predicted = network(x).float()
            torch.autograd.grad(((predicted[rows, site] - SITE_TARGET) ** 2).sum(), x)
        return (time.perf_counter() - start) / (args.steps * args.batch)

    runs = {name: (folded if "fold" in name else model, name.startswith("bf16"), "CL" in name) for name in wanted}
    for run in runs.values():
        step(*run)  # warm-up
    times = {name: [] for name in wanted}
    for repeat in range(args.repeats):
        for name in wanted[repeat % len(wanted):] + wanted[: repeat % len(wanted)]:
            times[name].append(step(*runs[name]))
    model.to(memory_format=torch.contiguous_format)
    folded.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        reference = model(images)
        fold_error = float((folded(images) - reference).abs().max() / reference.abs().max())
    print(json.dumps({"backbone": args.backbone, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                      "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
                      "native_bf16": has_native_bf16("cpu"), "fold_relative_error": fold_error}))
    base = np.array(times[wanted[0]])
    for name, values in times.items():
        ratio = base / np.array(values)
        print(json.dumps({"variant": name, "ms_per_image_step": round(float(np.median(values)) * 1e3, 2),
                          f"speedup_vs_{wanted[0]}": [round(float(x), 2) for x in (np.median(ratio), ratio.min(), ratio.max())]}))


if __name__ == "__main__":
    main()
