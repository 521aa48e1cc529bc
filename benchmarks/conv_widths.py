"""Ten modules' 3x3 convolutions at the sizes of the shared ResNet-20's last stage, by channels per module and by
how they run, against the parent's one 64-channel convolution. All channels-last, on the CPU.

    python benchmarks/conv_widths.py [--images 256] [--repeats 30]

`folded` is the exact engine's form on a CPU (cnnmod.engine.folding): each module's convolution on its own batch
slice. `grouped` is one convolution of ten groups. Last line: `ratio <folded 16-channel ms / parent 64-channel
ms>`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

MODULES = 10
SIDE = 8
CL = torch.channels_last


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    b = args.images
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(b, 64, SIDE, SIDE, generator=gen).contiguous(memory_format=CL)
        w = torch.randn(64, 64, 3, 3, generator=gen).contiguous(memory_format=CL)
        parent = median_ms(lambda: F.conv2d(x, w, padding=1), args.repeats)
        print(f"parent, 64 channels: {parent:.2f} ms")
        folded16 = 0.0
        for c in (8, 10, 12, 13, 15, 16, 20, 24):
            rows = torch.randn(MODULES * b, c, SIDE, SIDE, generator=gen).contiguous(memory_format=CL)
            ws = [torch.randn(c, c, 3, 3, generator=gen).contiguous(memory_format=CL) for _ in range(MODULES)]
            parts = rows.chunk(MODULES)
            folded = median_ms(lambda ps=parts, ks=ws: torch.cat([F.conv2d(p, k, padding=1)
                                                                   for p, k in zip(ps, ks, strict=True)]),
                               args.repeats)
            side = torch.randn(b, MODULES * c, SIDE, SIDE, generator=gen).contiguous(memory_format=CL)
            stacked = torch.cat(ws).contiguous(memory_format=CL)
            grouped = median_ms(lambda s=side, k=stacked: F.conv2d(s, k, padding=1, groups=MODULES), args.repeats)
            print(f"{MODULES} modules x {c} channels: folded {folded:.2f} ms, grouped {grouped:.2f} ms, "
                  f"multiply-accumulates {MODULES * c * c / 64 / 64:.2f} of the parent's")
            if c == 16:
                folded16 = folded
    print(f"ratio {folded16 / parent:.3f}")


if __name__ == "__main__":
    main()
