import json
import os
import sys
import time
from pathlib import Path

import pytest

from cnnmod.errors import CnnmodError
from cnnmod.workflows.energy import EnergyMeter, EnergyReport, paper_kwh

REL = 1e-9
NO_POWERCAP = Path("/nonexistent/powercap")


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def _domain(root: Path, name: str, kind: str, energy_uj: int, max_range: int = 10**12) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(kind + "\n")
    (d / "max_energy_range_uj").write_text(f"{max_range}\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    return d / "energy_uj"


def _set(counter: Path, energy_uj: int) -> None:
    counter.write_text(f"{energy_uj}\n")


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """The slice of pynvml the meter uses: two GPUs with an energy counter, or only power readings."""

    def __init__(self, gpus: int = 2, counter: bool = True, power_mw: float = 250_000.0) -> None:
        self.gpus, self.counter, self.power_mw = gpus, counter, power_mw
        self.energy_mj = [1_000_000.0] * gpus
        self.initialised = False
        self.shut_down = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return int(uuid.rsplit("-", 1)[1])

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> float:
        if not self.counter:
            raise FakeNVMLError("Not Supported")
        return self.energy_mj[h]

    def nvmlDeviceGetPowerUsage(self, h: int) -> float:
        return self.power_mw


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


@pytest.fixture(autouse=True)
def default_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CNNMOD_CPU_WATTS_PER_CORE", raising=False)


def test_paper_formula_by_hand() -> None:
    kwh = paper_kwh(3600.0, 100.0, 10.0, 250.0, 1)
    assert kwh == pytest.approx(1.58 * 360 / 1000, rel=REL)
    assert paper_kwh(1800.0, 100.0, 10.0, 250.0, 2) == pytest.approx(1.58 * 0.5 * 610 / 1000, rel=REL)
    r = EnergyReport.from_joules(3600.0, 100.0 * 3600, 10.0 * 3600, 250.0 * 3600, 1, "rapl+nvml")
    assert (r.cpu_watts, r.dram_watts, r.gpu_watts) == pytest.approx((100.0, 10.0, 250.0), rel=REL)
    assert r.kwh == pytest.approx(1.58 * 360 / 1000, rel=REL)
    assert r.co2e_lbs == pytest.approx(0.954 * r.kwh, rel=REL)


def test_estimate_of_a_busy_loop_is_positive() -> None:
    with EnergyMeter(NO_POWERCAP, use_nvml=False) as m:
        _busy(0.05)
    r = m.report
    assert r.method == "estimate"
    assert r.seconds >= 0.05
    assert r.cpu_watts > 0 and r.dram_watts > 0 and r.gpu_watts == 0 and r.gpus == 0
    assert r.kwh > 0 and r.co2e_lbs == pytest.approx(0.954 * r.kwh, rel=REL)
    assert r.kwh == pytest.approx(paper_kwh(r.seconds, r.cpu_watts, r.dram_watts, 0.0, 0), rel=REL)
    assert r.cpu_watts <= 12 * (os.cpu_count() or 1) * 1.1  # never more than all cores busy
    assert m.steps == {}
    assert r.describe().endswith("lbs CO2e (estimate)") and " kWh, " in r.describe()


def test_cpu_watts_per_core_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNMOD_CPU_WATTS_PER_CORE", "0")
    with EnergyMeter(NO_POWERCAP, use_nvml=False) as m:
        _busy(0.02)
    assert m.report.cpu_watts == 0 and m.report.kwh > 0  # DRAM still counts
    monkeypatch.setenv("CNNMOD_CPU_WATTS_PER_CORE", "lots")
    with pytest.raises(CnnmodError, match="CNNMOD_CPU_WATTS_PER_CORE"):
        EnergyMeter(NO_POWERCAP)


def test_steps_are_positive_and_add_up_to_the_total() -> None:
    with EnergyMeter(NO_POWERCAP, use_nvml=False) as m:
        with m.step("observe"):
            _busy(0.02)
        with m.step("derive"):
            _busy(0.02)
        with m.step("observe"):  # a name used twice adds up
            _busy(0.01)
    steps, total = m.steps, m.report
    assert set(steps) == {"observe", "derive"}
    for s in steps.values():
        assert s.seconds > 0 and s.kwh > 0 and s.co2e_lbs > 0 and s.method == "estimate"
    summed = steps["observe"] + steps["derive"]
    assert summed.seconds <= total.seconds and summed.kwh <= total.kwh * (1 + REL)


def test_report_is_exactly_steps_plus_remainder() -> None:
    with EnergyMeter(NO_POWERCAP, use_nvml=False) as m:
        _busy(0.02)  # untracked
        with m.step("a"):
            _busy(0.02)
    total, step = m.report, m.steps["a"]
    assert step.seconds < total.seconds and step.kwh < total.kwh
    # the remainder is positive and the figures add up exactly (up to float rounding)
    rest_kwh = total.kwh - step.kwh
    assert rest_kwh > 0
    assert total.co2e_lbs == pytest.approx(0.954 * total.kwh, rel=REL)
    assert total.kwh == pytest.approx(paper_kwh(total.seconds, total.cpu_watts, total.dram_watts, 0.0, 0), rel=REL)


def test_steps_only_inside_the_meter() -> None:
    m = EnergyMeter(NO_POWERCAP, use_nvml=False)
    with pytest.raises(RuntimeError, match="inside"):
        with m.step("x"):
            pass
    with pytest.raises(RuntimeError, match="ended"):
        _ = m.report
    with m:
        with m.step("outer"), pytest.raises(RuntimeError, match="nest"):
            with m.step("inner"):
                pass
    assert set(m.steps) == {"outer"}


def test_rapl_counters_with_dram_and_wrap_around(tmp_path: Path) -> None:
    pkg0 = _domain(tmp_path, "intel-rapl:0", "package-0", 5_000_000)
    pkg1 = _domain(tmp_path, "intel-rapl:1", "package-1", 990_000_000, max_range=1_000_000_000)
    dram = _domain(tmp_path, "intel-rapl:0:1", "dram", 7_000_000)
    core = _domain(tmp_path, "intel-rapl:0:0", "core", 0)  # inside the package: not counted twice
    psys = _domain(tmp_path, "intel-rapl:2", "psys", 0)  # the whole platform: not counted
    mmio = _domain(tmp_path, "intel-rapl-mmio:0", "package-0", 0)  # the same package again: not counted
    with EnergyMeter(tmp_path, use_nvml=False, sample_seconds=60) as m:
        _set(pkg0, 5_000_000 + 3_000_000)  # 3 J
        _set(pkg1, 1_000_000)  # wrapped: 10 J + 1 J
        _set(dram, 7_000_000 + 500_000)  # 0.5 J
        for c in (core, psys, mmio):
            _set(c, 10**11)
    r = m.report
    assert r.method == "rapl"
    assert r.cpu_watts * r.seconds == pytest.approx(14.0, rel=REL)
    assert r.dram_watts * r.seconds == pytest.approx(0.5, rel=REL)
    assert r.kwh == pytest.approx(1.58 * 14.5 / 3.6e6, rel=REL)
    assert r.co2e_lbs == pytest.approx(0.954 * r.kwh, rel=REL)


def test_rapl_sees_every_wrap_and_steps_add_up(tmp_path: Path) -> None:
    top = 1_000_000_000
    pkg = _domain(tmp_path, "amd-rapl:0", "package-0", top - 1_000_000, max_range=top)
    with EnergyMeter(tmp_path, use_nvml=False, sample_seconds=60) as m:
        with m.step("one"):
            _set(pkg, 1_000_000)  # 2 J across the wrap
        with m.step("two"):
            _set(pkg, top - 1_000_000)  # 998 J
        _set(pkg, 2_000_000)  # 3 J across the second wrap, untracked
    assert m.report.method == "rapl"
    assert m.steps["one"].cpu_watts * m.steps["one"].seconds == pytest.approx(2.0, rel=REL)
    assert m.steps["two"].cpu_watts * m.steps["two"].seconds == pytest.approx(998.0, rel=REL)
    assert m.report.cpu_watts * m.report.seconds == pytest.approx(1003.0, rel=REL)
    # the untracked 3 J of CPU are in the total; DRAM is estimated per interval from the wall clock, so only
    # its sign is known here (the exact add-up is test_report_is_exactly_steps_plus_remainder)
    untracked_cpu_kwh = 1.58 * 3 / 3.6e6
    assert m.report.kwh >= (m.steps["one"].kwh + m.steps["two"].kwh + untracked_cpu_kwh) * (1 - 1e-9)


def test_rapl_unreadable_falls_back_to_estimate(tmp_path: Path) -> None:
    pkg = _domain(tmp_path, "intel-rapl:0", "package-0", 1_000)
    with EnergyMeter(tmp_path, use_nvml=False, sample_seconds=60) as m:
        pass  # the counter has not updated yet: 0 J of CPU, still a RAPL reading; DRAM is the estimate
    assert m.report.method == "rapl" and m.report.cpu_watts == 0 and m.report.kwh > 0
    with EnergyMeter(tmp_path, use_nvml=False, sample_seconds=60) as m:
        _set(pkg, 2_000)
        pkg.unlink()  # the counter vanishes (or turns root-only) mid-measurement
    assert m.report.method == "estimate" and m.report.kwh > 0
    (tmp_path / "intel-rapl:0" / "name").write_text("package-0\n")
    pkg.write_text("not a number\n")
    with EnergyMeter(tmp_path, use_nvml=False) as m:
        pass
    assert m.report.method == "estimate"


def test_sampling_thread_stops_on_exit(tmp_path: Path) -> None:
    _domain(tmp_path, "intel-rapl:0", "package-0", 0)
    m = EnergyMeter(tmp_path, use_nvml=False, sample_seconds=0.005)
    with m:
        thread = m._thread
        assert thread is not None and thread.is_alive()
        time.sleep(0.02)
    assert not thread.is_alive() and m._thread is None


def test_nvml_energy_counter(tmp_path: Path, fake_nvml: FakeNvml) -> None:
    pkg = _domain(tmp_path, "intel-rapl:0", "package-0", 0)
    with EnergyMeter(tmp_path, sample_seconds=60) as m:
        assert fake_nvml.initialised
        _set(pkg, 1_000_000)
        fake_nvml.energy_mj[0] += 3000.0  # 3 J
        fake_nvml.energy_mj[1] += 1000.0  # 1 J
    r = m.report
    assert fake_nvml.shut_down
    assert r.method == "rapl+nvml" and r.gpus == 2
    assert r.gpus * r.gpu_watts * r.seconds == pytest.approx(4.0, rel=REL)
    assert r.kwh == pytest.approx(paper_kwh(r.seconds, r.cpu_watts, r.dram_watts, r.gpu_watts, 2), rel=REL)


def test_nvml_sampled_power_and_visible_devices(fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml.counter = False
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-fake-1")
    with EnergyMeter(NO_POWERCAP, sample_seconds=0.005) as m:
        with m.step("work"):
            _busy(0.02)
    r = m.report
    assert r.method == "estimate+nvml" and r.gpus == 1
    assert r.gpu_watts == pytest.approx(250.0, rel=1e-6)
    assert m.steps["work"].gpu_watts == pytest.approx(250.0, rel=1e-6)
    assert fake_nvml.shut_down


def test_nvml_shut_down_when_the_work_fails(fake_nvml: FakeNvml) -> None:
    with pytest.raises(ZeroDivisionError), EnergyMeter(NO_POWERCAP):
        _ = 1 / 0
    assert fake_nvml.initialised and fake_nvml.shut_down


def test_nvml_unavailable_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def nvmlInit(self) -> None:
            raise FakeNVMLError("Driver Not Loaded")

    monkeypatch.setitem(sys.modules, "pynvml", Broken())
    with EnergyMeter(NO_POWERCAP) as m:
        pass
    assert m.report.method == "estimate" and m.report.gpus == 0
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    with EnergyMeter(NO_POWERCAP) as m:
        pass
    assert m.report.method == "estimate"


def test_add_sums_and_weights_powers() -> None:
    a = EnergyReport.from_joules(10.0, 100.0, 10.0, 0.0, 0, "estimate")
    b = EnergyReport.from_joules(30.0, 900.0, 30.0, 30.0 * 200.0, 1, "estimate")
    s = a + b
    assert s.seconds == 40.0 and s.method == "estimate"
    assert s.kwh == pytest.approx(a.kwh + b.kwh, rel=REL) and s.co2e_lbs == pytest.approx(a.co2e_lbs + b.co2e_lbs)
    assert s.cpu_watts == pytest.approx((100.0 + 900.0) / 40.0) and s.dram_watts == pytest.approx(1.0)
    assert s.gpus == 1 and s.gpu_watts == pytest.approx(6000.0 / 40.0)
    assert s.kwh == pytest.approx(paper_kwh(s.seconds, s.cpu_watts, s.dram_watts, s.gpu_watts, s.gpus), rel=REL)
    assert sum([a, b]) == s
    c = EnergyReport.from_joules(5.0, 5.0, 0.0, 0.0, 0, "rapl")
    assert (s + c).method == "estimate,rapl" and (c + s).method == "estimate,rapl"
    assert (s + c + c).method == "estimate,rapl"


def test_zero_interval_is_all_zero() -> None:
    z = EnergyReport.from_joules(0.0, 1.0, 1.0, 1.0, 1, "estimate")
    assert (z.seconds, z.cpu_watts, z.kwh, z.co2e_lbs) == (0.0, 0.0, 0.0, 0.0)
    assert (z + z).cpu_watts == 0.0


def test_to_json_round_trips() -> None:
    with EnergyMeter(NO_POWERCAP, use_nvml=False) as m:
        _busy(0.01)
    data = m.report.to_json()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {"seconds", "cpu_watts", "dram_watts", "gpu_watts", "gpus", "kwh", "co2e_lbs", "method"}
    assert type(data["gpus"]) is int and type(data["kwh"]) is float
    assert EnergyReport.from_json(json.loads(json.dumps(data))) == m.report
