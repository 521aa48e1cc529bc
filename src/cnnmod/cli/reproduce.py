"""`cnnmod reproduce`: the paper's Tables 1-6 and Figure 6 regenerated into one folder, beside the paper's own."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import CnnmodError
from ..paper.profiles import PROFILES
from ..paper.reproduce import SHARED, TABLES
from .app import cli, device_option, emit, json_option, reports_errors
from .params import SEED


def _only(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if not value:
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in names if t not in TABLES]
    if not names or unknown:
        raise click.BadParameter(f"takes {', '.join(TABLES)}, comma-separated; got {value!r}")
    return names


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Reproduction folder: report.html, report.md, results.json, and the cache of finished parts.")
@click.option("--profile", "profile_name", type=click.Choice(list(PROFILES)), default="quick", show_default=True,
              help="quick: every table in minutes on a 2-core CPU (small subsets, 1 epoch); cpu: about 70 minutes "
                   "there; full: the paper's sizes (200 epochs, all classes), for a GPU.")
@click.option("--only", default=None, metavar="TABLES", callback=_only,
              help=f"Run only these, comma-separated ({', '.join(TABLES)}); the report still shows every table, "
                   "with any parts finished earlier.")
@click.option("--cifar100", type=click.Path(exists=True, path_type=Path), default=None,
              help="The official CIFAR-100 python files (cifar-100-python/); without it the CIFAR-100 rows are "
                   "marked 'data not here'.")
@click.option("--shared", type=click.Path(file_okay=False, path_type=Path), default=SHARED,
              show_default=True, help="Folder holding data/ (CIFAR-10 JPEG, Tiny-ImageNet subset) and models/.")
@click.option("--fashion-mnist", "fashion_mnist", type=click.Path(exists=True, path_type=Path), default=None,
              help="Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist, else the embedded sample).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--overwrite", is_flag=True,
              help="Start an existing reproduction folder afresh, discarding its cached parts (without it, a "
                   "reproduction folder is resumed). Nothing else is ever replaced.")
@device_option
@json_option
@reports_errors
def reproduce(out: Path, profile_name: str, only: list[str] | None, cifar100: Path | None, shared: Path,
              fashion_mnist: Path | None, seed: int, overwrite: bool, device: str | None, as_json: bool) -> None:
    """Regenerate the paper's evaluation (Tables 1-6, Figure 6) with its figures beside ours.

    Writes OUT/report.html (one self-contained file), OUT/report.md (its tables in Markdown) and OUT/results.json
    (every number, keyed table1 ... table6, figure6). Finished parts are cached in OUT by a hash of their inputs,
    so running the same command again resumes an interrupted run and redoes only what changed. Needs matplotlib
    for the plots (pip install 'cnnmod[report]')."""
    from ..paper.report import require_matplotlib
    from ..paper.reproduce import Sources, open_reproduction
    from ..paper.reproduce import reproduce as run
    from ..workflows.energy import EnergyMeter

    require_matplotlib("cnnmod reproduce")
    sources = Sources.default(shared, cifar100)
    if fashion_mnist is not None:
        sources = Sources(sources.cifar10, sources.imagenet200, fashion_mnist, sources.cifar100, sources.models)
    resumed = open_reproduction(out, overwrite)
    with EnergyMeter() as meter:
        results = run(out, PROFILES[profile_name], sources, only, device, seed, progress=not as_json)
    statuses = [p["status"] for p in results["parts"]]
    failed = [p for p in results["parts"] if p["status"] == "failed"]
    payload = {"out": str(out), "report": str(out / "report.html"), "markdown": str(out / "report.md"),
               "results": str(out / "results.json"),
               "profile": profile_name, "resumed": resumed, "run_seconds": results["run_seconds"],
               "parts": {s: statuses.count(s) for s in sorted(set(statuses))}}
    counts = ", ".join(f"{n} {s}" for s, n in payload["parts"].items())
    emit(as_json, payload, f"{'resumed' if resumed else 'wrote'} {out}: {counts}\nreport: {out / 'report.html'}\n"
                           f"results: {out / 'results.json'}", meter.report)
    if failed:
        raise CnnmodError(f"{len(failed)} part(s) failed, first {failed[0]['part']}: {failed[0]['message']} "
                          "(the report marks them; run the same command again to retry them)")
