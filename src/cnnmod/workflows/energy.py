"""Energy and CO2e of a command, measured the same way for every command, with the paper's formula.

    p_t  = 1.58 * t * (p_c + p_r + g * p_g) / 1000      kWh; t in hours, powers in W
    CO2e = 0.954 * p_t                                   lbs

p_c is the average CPU power, p_r the average DRAM power, p_g the average power of one GPU and g the number
of GPUs; 1.58 is the data-centre PUE and 0.954 lbs/kWh the carbon intensity the paper uses.

Where the figures come from (`EnergyReport.method` says which, per interval):

- "rapl": CPU energy from the Linux powercap RAPL counters (`<root>/intel-rapl:N/energy_uj`, or
  `amd-rapl:N`) of every domain named `package-*`, DRAM energy from every domain named `dram`, in
  microjoules, with `max_energy_range_uj` added back when a counter wraps. The counters are read at each
  boundary and every `sample_seconds` in between, so a long command sees every wrap. RAPL measures the
  whole machine, not this process. If the machine has no `dram` domain, DRAM power is the estimate below.
- "estimate": where RAPL is missing or unreadable (it is root-only on many systems):
  CPU power = process CPU seconds (this process, `time.process_time`, plus its waited-for children,
  `getrusage(RUSAGE_CHILDREN)`) / wall seconds x 12 W per busy core (env `CNNMOD_CPU_WATTS_PER_CORE`);
  DRAM power = 0.375 W per GB (1e9 bytes) of peak resident memory (`getrusage(RUSAGE_SELF).ru_maxrss`),
  integrated over time with the peak reached by the end of each interval.
  RAPL counters update about once a millisecond, so a RAPL step shorter than that may read 0 J of CPU
  energy; what it used shows up in the next interval, and totals stay exact.
- "+nvml" (as in "rapl+nvml", "estimate+nvml"): GPU energy from NVML (`pynvml`, package `nvidia-ml-py`,
  optional): `nvmlDeviceGetTotalEnergyConsumption` (mJ) where the GPU supports it, otherwise
  `nvmlDeviceGetPowerUsage` (mW) sampled at each boundary and every `sample_seconds`, integrated with the
  trapezoid rule. g is the number of GPUs visible to this process (`CUDA_VISIBLE_DEVICES` when it is set,
  otherwise all that NVML lists). Without NVML, g = 0 and p_g = 0.

No reading that is unavailable raises: the meter falls back to the estimate and the method says so.
Wall time is `time.perf_counter`.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from ..errors import CnnmodError

try:
    import resource
except ImportError:  # not on Windows: no children's CPU time or peak RSS there
    resource = None  # type: ignore[assignment]

PUE = 1.58
LBS_CO2E_PER_KWH = 0.954
CPU_WATTS_PER_CORE = 12.0
DRAM_WATTS_PER_GB = 0.375
CPU_WATTS_ENV = "CNNMOD_CPU_WATTS_PER_CORE"

_RAPL_DOMAIN = re.compile(r"^(intel|amd)-rapl(:\d+)+$")


def paper_kwh(seconds: float, cpu_watts: float, dram_watts: float, gpu_watts: float, gpus: int) -> float:
    """The paper's `p_t = 1.58 * t * (p_c + p_r + g * p_g) / 1000`, with t given in seconds."""
    return PUE * (seconds / 3600.0) * (cpu_watts + dram_watts + gpus * gpu_watts) / 1000.0


def _small(x: float) -> str:
    return f"{x:.6f}" if x == 0 or x >= 1e-6 else f"{x:.2e}"


@dataclass(frozen=True)
class EnergyReport:
    """Energy of one interval. Powers are averages over `seconds`; `gpu_watts` is per GPU."""

    seconds: float
    cpu_watts: float
    dram_watts: float
    gpu_watts: float
    gpus: int
    kwh: float
    co2e_lbs: float
    method: str

    @classmethod
    def from_joules(cls, seconds: float, cpu_j: float, dram_j: float, gpu_j: float, gpus: int,
                    method: str) -> EnergyReport:
        """Average powers and the paper's kWh from energies over an interval (all zero when it is empty)."""
        if seconds <= 0:
            return cls(0.0, 0.0, 0.0, 0.0, gpus, 0.0, 0.0, method)
        cpu_w, dram_w = cpu_j / seconds, dram_j / seconds
        gpu_w = gpu_j / seconds / gpus if gpus else 0.0
        kwh = paper_kwh(seconds, cpu_w, dram_w, gpu_w, gpus)
        return cls(seconds, cpu_w, dram_w, gpu_w, gpus, kwh, LBS_CO2E_PER_KWH * kwh, method)

    def __add__(self, other: EnergyReport) -> EnergyReport:
        """Both intervals together: times and energies add, powers are time-weighted means.

        `gpus` is the larger count and `gpu_watts` is spread over it, so `paper_kwh` of the sum is the sum.
        """
        if not isinstance(other, EnergyReport):
            return NotImplemented
        seconds = self.seconds + other.seconds
        gpus = max(self.gpus, other.gpus)
        gpu_total = self.gpus * self.gpu_watts * self.seconds + other.gpus * other.gpu_watts * other.seconds

        def mean(a: float, b: float) -> float:
            return (a * self.seconds + b * other.seconds) / seconds if seconds > 0 else 0.0

        if self.method == other.method:
            method = self.method
        else:
            method = ",".join(sorted(set(self.method.split(",")) | set(other.method.split(","))))
        return EnergyReport(
            seconds=seconds,
            cpu_watts=mean(self.cpu_watts, other.cpu_watts),
            dram_watts=mean(self.dram_watts, other.dram_watts),
            gpu_watts=gpu_total / seconds / gpus if seconds > 0 and gpus else 0.0,
            gpus=gpus,
            kwh=self.kwh + other.kwh,
            co2e_lbs=self.co2e_lbs + other.co2e_lbs,
            method=method,
        )

    def __radd__(self, other: object) -> EnergyReport:
        """So that `sum(reports)` works (it starts from 0)."""
        if other == 0:
            return self
        return NotImplemented

    def to_json(self) -> dict[str, Any]:
        return {k: (int(v) if k == "gpus" else str(v) if k == "method" else float(v))
                for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EnergyReport:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def describe(self) -> str:
        seconds = f"{self.seconds:.1f}" if self.seconds >= 0.1 or self.seconds == 0 else f"{self.seconds:.2g}"
        return (f"{seconds} s, {_small(self.kwh)} kWh, {_small(self.co2e_lbs)} lbs CO2e "
                f"({self.method})")


@dataclass(frozen=True)
class _Snapshot:
    """Cumulative readings since the meter started; an interval's figures are differences of two of these.

    `rapl_cpu_j`, `rapl_dram_j` and `gpu_j` are None where that source is absent or has failed.
    """

    t: float
    est_cpu_j: float
    est_dram_j: float
    rapl_cpu_j: float | None
    rapl_dram_j: float | None
    gpu_j: float | None
    gpus: int = 0


@dataclass
class _Counter:
    """One RAPL energy counter, accumulated across wrap-arounds."""

    path: Path
    max_range: int
    last: int
    total_uj: int = 0

    def advance(self) -> None:
        now = int(self.path.read_text())
        delta = now - self.last
        if delta < 0:
            delta += self.max_range
        self.total_uj += max(delta, 0)
        self.last = now


def _rapl_counters(root: Path) -> tuple[list[_Counter], list[_Counter]]:
    """Readable package and dram counters under a powercap folder; empty lists where there are none."""
    packages: list[_Counter] = []
    drams: list[_Counter] = []
    try:
        entries = sorted(root.iterdir()) if root.is_dir() else []
    except OSError:
        return [], []
    for entry in entries:
        if not _RAPL_DOMAIN.match(entry.name):
            continue
        try:
            name = (entry / "name").read_text().strip()
            if not (name.startswith("package") or name == "dram"):
                continue  # core/uncore lie inside a package; psys covers the whole platform
            path = entry / "energy_uj"
            counter = _Counter(path, int((entry / "max_energy_range_uj").read_text()), int(path.read_text()))
        except (OSError, ValueError):
            continue
        (drams if name == "dram" else packages).append(counter)
    return packages, drams


def _load_pynvml() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def _visible_gpu_handles(nvml: Any) -> list[Any]:
    """Handles of the GPUs this process may use: `CUDA_VISIBLE_DEVICES` when set, else all of them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for item in (s.strip() for s in visible.split(",")):
        if not item:
            continue
        if item.isdigit():
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(item)))
        else:
            handles.append(nvml.nvmlDeviceGetHandleByUUID(item))
    return handles


class _Gpus:
    """NVML energy of the visible GPUs: the energy counter where supported, else sampled power."""

    def __init__(self, nvml: Any, handles: list[Any], t: float) -> None:
        self.nvml = nvml
        self.handles = handles
        self.total_j = 0.0
        self.counting: list[bool] = []
        self.last: list[float] = []
        for h in handles:
            try:
                self.last.append(float(nvml.nvmlDeviceGetTotalEnergyConsumption(h)))  # mJ
                self.counting.append(True)
            except Exception:  # NVMLError_NotSupported and kin: fall back to sampling power
                self.last.append(float(nvml.nvmlDeviceGetPowerUsage(h)))  # mW
                self.counting.append(False)
        self.t = t

    def advance(self, t: float) -> None:
        dt = t - self.t
        for i, h in enumerate(self.handles):
            if self.counting[i]:
                now = float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h))
                self.total_j += max(now - self.last[i], 0.0) / 1000.0
            else:
                now = float(self.nvml.nvmlDeviceGetPowerUsage(h))
                self.total_j += (now + self.last[i]) / 2.0 / 1000.0 * dt
            self.last[i] = now
        self.t = t


def _cpu_watts_per_core() -> float:
    raw = os.environ.get(CPU_WATTS_ENV)
    if raw is None:
        return CPU_WATTS_PER_CORE
    try:
        watts = float(raw)
    except ValueError:
        watts = -1.0
    if not watts >= 0:
        raise CnnmodError(f"{CPU_WATTS_ENV}={raw!r} is not a number of watts >= 0; set it to e.g. 12 or unset it")
    return watts


def _process_cpu_seconds() -> float:
    seconds = time.process_time()
    if resource is not None:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds += children.ru_utime + children.ru_stime
    else:
        t = os.times()
        seconds += t.children_user + t.children_system
    return seconds


def _peak_rss_gb() -> float:
    if resource is None:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux


@dataclass
class _Parts:
    """What one `with` block recorded: snapshot pairs for each step, in order."""

    start: _Snapshot
    steps: list[tuple[str, _Snapshot, _Snapshot]] = field(default_factory=list)
    open_step: str | None = None


class EnergyMeter:
    """Context manager: `with EnergyMeter() as m: ...; m.report`; `with m.step("observe"): ...` records named
    steps inside one measurement; `m.steps` -> dict[str, EnergyReport] (a name used twice adds up);
    `m.report` is the total over the whole `with` block: exactly the sum of the steps and the time between
    them, so the figures add up.

    `sample_seconds` is how often a background thread reads RAPL and NVML power between boundaries (it runs
    only where one of them is in use), so that counter wrap-arounds are not missed.
    """

    def __init__(self, powercap_root: Path = Path("/sys/class/powercap"), use_nvml: bool = True, *,
                 sample_seconds: float = 1.0) -> None:
        self.powercap_root = Path(powercap_root)
        self.use_nvml = use_nvml
        self.sample_seconds = sample_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._reset()

    def _reset(self) -> None:
        self._watts_per_core = _cpu_watts_per_core()
        self._packages: list[_Counter] = []
        self._drams: list[_Counter] = []
        self._rapl_ok = False
        self._gpus: _Gpus | None = None
        self._cpu0 = 0.0
        self._est_dram_j = 0.0
        self._t_last = 0.0
        self._parts: _Parts | None = None
        self._end: _Snapshot | None = None
        self._report: EnergyReport | None = None
        self._steps: dict[str, EnergyReport] = {}

    # -- readings ---------------------------------------------------------------------------------------------

    def _start_gpus(self, t: float) -> None:
        nvml = _load_pynvml() if self.use_nvml else None
        if nvml is None:
            return
        try:
            nvml.nvmlInit()
        except Exception:  # no driver, no GPU: no GPU figures
            return
        self._nvml = nvml
        try:
            handles = _visible_gpu_handles(nvml)
            if handles:
                self._gpus = _Gpus(nvml, handles, t)
        except Exception:  # a device NVML cannot read: no GPU figures rather than a failed command
            self._gpus = None

    def _snapshot(self) -> _Snapshot:
        """Read every source, add what happened since the last reading, and return the running totals."""
        with self._lock:
            t = time.perf_counter()
            self._est_dram_j += DRAM_WATTS_PER_GB * _peak_rss_gb() * max(t - self._t_last, 0.0)
            self._t_last = t
            if self._rapl_ok:
                try:
                    for counter in (*self._packages, *self._drams):
                        counter.advance()
                except (OSError, ValueError):
                    self._rapl_ok = False  # from here on, the estimate
            if self._gpus is not None:
                try:
                    self._gpus.advance(t)
                except Exception:  # NVML errors have no common base outside pynvml
                    self._gpus = None
            rapl_ok = self._rapl_ok
            return _Snapshot(
                t=t,
                est_cpu_j=(_process_cpu_seconds() - self._cpu0) * self._watts_per_core,
                est_dram_j=self._est_dram_j,
                rapl_cpu_j=sum(c.total_uj for c in self._packages) / 1e6 if rapl_ok else None,
                rapl_dram_j=sum(c.total_uj for c in self._drams) / 1e6 if rapl_ok and self._drams else None,
                gpu_j=self._gpus.total_j if self._gpus is not None else None,
                gpus=len(self._gpus.handles) if self._gpus is not None else 0,
            )

    def _between(self, a: _Snapshot, b: _Snapshot) -> EnergyReport:
        seconds = b.t - a.t
        if a.rapl_cpu_j is not None and b.rapl_cpu_j is not None:
            method, cpu_j = "rapl", b.rapl_cpu_j - a.rapl_cpu_j
            if a.rapl_dram_j is not None and b.rapl_dram_j is not None:
                dram_j = b.rapl_dram_j - a.rapl_dram_j
            else:
                dram_j = b.est_dram_j - a.est_dram_j
        else:
            method, cpu_j, dram_j = "estimate", b.est_cpu_j - a.est_cpu_j, b.est_dram_j - a.est_dram_j
        gpu_j, gpus = 0.0, 0
        if a.gpu_j is not None and b.gpu_j is not None:
            method, gpu_j, gpus = method + "+nvml", b.gpu_j - a.gpu_j, b.gpus
        return EnergyReport.from_joules(seconds, max(cpu_j, 0.0), max(dram_j, 0.0), max(gpu_j, 0.0), gpus, method)

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_seconds):
            self._snapshot()

    # -- context manager -------------------------------------------------------------------------------------

    def __enter__(self) -> EnergyMeter:
        if self._parts is not None and self._end is None:
            raise RuntimeError("this EnergyMeter is already measuring; use a new one or m.step(name)")
        self._reset()
        self._packages, self._drams = _rapl_counters(self.powercap_root)
        self._rapl_ok = bool(self._packages)
        self._cpu0 = _process_cpu_seconds()
        self._t_last = time.perf_counter()
        try:
            self._start_gpus(self._t_last)
            self._parts = _Parts(start=self._snapshot())
            if self._rapl_ok or (self._gpus is not None and not all(self._gpus.counting)):
                self._stop.clear()
                self._thread = threading.Thread(target=self._sample, name="cnnmod-energy", daemon=True)
                self._thread.start()
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._end = self._snapshot()
            self._finish()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down is best effort
                pass
            self._nvml = None

    def _finish(self) -> None:
        assert self._parts is not None and self._end is not None
        parts: list[EnergyReport] = []
        steps: dict[str, EnergyReport] = {}
        previous = self._parts.start
        for name, a, b in self._parts.steps:
            if a.t > previous.t:
                parts.append(self._between(previous, a))
            step = self._between(a, b)
            parts.append(step)
            steps[name] = steps[name] + step if name in steps else step
            previous = b
        parts.append(self._between(previous, self._end))
        self._steps = steps
        self._report = sum(parts[1:], parts[0])

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Record the enclosed work as step `name` of this measurement (steps do not nest)."""
        if self._parts is None or self._end is not None:
            raise RuntimeError(f"step {name!r} must run inside `with EnergyMeter() as m:`")
        if self._parts.open_step is not None:
            raise RuntimeError(f"step {name!r} is inside step {self._parts.open_step!r}; steps do not nest")
        self._parts.open_step = name
        start = self._snapshot()
        try:
            yield
        finally:
            self._parts.steps.append((name, start, self._snapshot()))
            self._parts.open_step = None

    @property
    def steps(self) -> dict[str, EnergyReport]:
        self._require_done()
        return dict(self._steps)

    @property
    def report(self) -> EnergyReport:
        self._require_done()
        assert self._report is not None
        return self._report

    def _require_done(self) -> None:
        if self._report is None:
            raise RuntimeError("EnergyMeter figures are ready once its `with` block has ended")
