"""What commands do differently under torchrun: read the data once into the cache, add up the energy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..data import Dataset, load_dataset
from ..engine.distributed import Shard
from ..workflows.energy import EnergyReport
from .common import open_dataset


def open_dataset_once(shard: Shard, path: Path, data_format: str | None, quiet: bool) -> Dataset:
    """The dataset, decoded (and cached) by rank 0 first; the other ranks then read rank 0's cache (or, on another
    machine, decode it without writing a cache): they write nothing."""
    data = shard.first(lambda: open_dataset(path, data_format, None, quiet))
    if data is not None:
        return data
    return load_dataset(path, format=data_format, progress=False, write_cache=False)


def total_energy(shard: Shard, report: EnergyReport) -> EnergyReport:
    """This process's energy, or under torchrun every process's: powers, kWh and CO2e summed over the ranks
    (the time is this rank's; all of them ran together)."""
    if shard.world == 1:
        return report
    cpu, dram, gpu = (shard.total(v) for v in (report.cpu_watts, report.dram_watts,
                                               report.gpu_watts * report.gpus))
    gpus = int(shard.total(float(report.gpus)))
    return replace(report, cpu_watts=cpu, dram_watts=dram, gpu_watts=gpu / gpus if gpus else 0.0, gpus=gpus,
                   kwh=shard.total(report.kwh), co2e_lbs=shard.total(report.co2e_lbs),
                   method=f"{report.method}, {shard.world} processes")
