"""`cnnmod decompose --method compact` on the shared ResNet-20 under torchrun with 2 one-thread processes against
one one-thread process, run one after the other, and whether their module files are identical.

    python benchmarks/compact_torchrun.py [--train-images 300000] [--processes 2] [--keep DIR]

Last line: `ratio <torchrun seconds / one-process seconds>` (the whole command each time).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def run(args: list[str], processes: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    start = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "cnnmod", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "Error" in line or line.startswith("error:")]
        sys.exit(f"failed: {errors[-1] if errors else done.returncode}")
    return time.perf_counter() - start


def digests(store: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((store / "modules").iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-images", type=int, default=300_000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="write the two stores here (one/, many/) instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = args.keep or temporary
        common = ["decompose", str(SHARED / "models" / "resnet20-12fca82f.th"), "--arch", "resnet20", "--data",
                  str(SHARED / "data" / "cifar10-jpg.tar.gz"), "--method", "compact", "--train-images",
                  str(args.train_images), "--device", "cpu"]
        one = run([*common, "--out", f"{work}/one"], 1)
        many = run([*common, "--out", f"{work}/many"], args.processes)
        same = digests(Path(work, "one")) == digests(Path(work, "many"))
    print(f"one process: {one:.1f} s; {args.processes} processes: {many:.1f} s; module files identical: "
          f"{'yes' if same else 'NO'}")
    print(f"ratio {many / one:.3f}")


if __name__ == "__main__":
    main()
