"""Peak resident memory of each phase of a compact decomposition: runs `cnnmod ARGS...` with the phases of
`cnnmod.engine.compact` wrapped, and prints each phase's peak on stderr ("[mem] ...").

    python scripts/compact_memory_phases.py decompose MODEL --data D --method compact --out S
"""

from __future__ import annotations

import atexit
import functools
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import cnnmod.engine.compact as compact

PHASES = ("class_importance", "recalibrate", "stack", "insert_batchnorm", "prefix_cache", "fine_tune",
          "load_stacked", "training_epoch_cost", "module_set")
current = ["start"]
peaks: dict[str, float] = {}


def resident_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1e6
    return 0.0


def sample() -> None:
    while True:
        phase = current[0]
        peaks[phase] = max(peaks.get(phase, 0.0), resident_gb())
        time.sleep(0.02)


def wrapped(name: str, run: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(run)
    def phase(*args: Any, **kwargs: Any) -> Any:
        current[0], start = name, time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            print(f"[mem] {name}: {time.perf_counter() - start:.1f} s, peak {peaks.get(name, 0.0):.2f} GB",
                  file=sys.stderr, flush=True)
            current[0] = f"after {name}"
    return phase


def main() -> None:
    for name in PHASES:
        setattr(compact, name, wrapped(name, getattr(compact, name)))
    threading.Thread(target=sample, daemon=True).start()
    atexit.register(lambda: print("[mem] " + ", ".join(f"{p} {gb:.2f}" for p, gb in peaks.items()) +
                                  f"; peak {max(peaks.values()):.2f} GB", file=sys.stderr))
    sys.argv = ["cnnmod", *sys.argv[1:]]
    from cnnmod.cli import main as cnnmod_main

    cnnmod_main()


if __name__ == "__main__":
    main()
