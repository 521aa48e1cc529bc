"""Nothing lost, nothing silent: every case a hostile user tried, through the real entry point (`main`), each
ending in one `error:` line and a non-zero exit, with every user file intact (docs/RELIABILITY.md)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnmod.errors import StoreError
from cnnmod.storage.outputs import OutputError, check_output, write_file, write_folder
from cnnmod.storage.store import load_composition, load_store, save_store

ASSETS = Path(str(resources.files("cnnmod") / "assets"))
MODEL = ASSETS / "smallcnn-fmnist.safetensors"
DATA = ASSETS / "fmnist-sample.npz"


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


def run_main(*args: object, cwd: Path | None = None) -> Run:
    """`cnnmod ARGS...` through the console script's `main`, in-process; stdout and stderr captured apart."""
    from cnnmod.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    argv, before_cwd, handler = sys.argv, os.getcwd(), signal.getsignal(signal.SIGINT)
    sys.argv = ["cnnmod", *[str(a) for a in args]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(before_cwd)
        signal.signal(signal.SIGINT, handler)
        torch.set_num_threads(threads)
    return Run(code, out.getvalue(), err.getvalue())


def assert_refused(run: Run, *words: str) -> None:
    """A non-zero exit with exactly one `error:` line on stderr (warnings aside), naming `words`."""
    assert run.code != 0, f"exit 0; stdout: {run.stdout[-500:]}"
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    others = [line for line in run.stderr.splitlines() if line and not line.startswith(("error: ", "warning: "))]
    assert len(errors) == 1 and not others, run.stderr
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of the embedded Fashion-MNIST CNN (20 samples per class, with its activity counts), made through
    the CLI."""
    out = tmp_path_factory.mktemp("reliability") / "base"
    run = run_main("decompose", MODEL, "--data", DATA, "--samples-per-class", 20, "--keep-activity", "--out", out)
    assert run.code == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def comp(base: Path) -> Path:
    out = base.parent / "comp"
    run = run_main("compose", f"{base}:Trouser,Bag", "--out", out)
    assert run.code == 0, run.stderr
    return out


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


# ------------------------------------------------------------------------------------------- 1. data loss


def _user_dir(work: Path) -> Path:
    (work / "mydir" / "sub").mkdir(parents=True)
    (work / "mydir" / "notes.txt").write_text("precious")
    (work / "mydir" / "sub" / "data.csv").write_text("1,2")
    return work / "mydir"


WRITERS: dict[str, Callable[[Path, Path, Path], list[object]]] = {
    "remove": lambda base, comp, out: ["remove", comp, "Bag", "--out", out],
    "replace": lambda base, comp, out: ["replace", comp, "Bag", f"{base}:Coat", "--out", out],
    "calibrate": lambda base, comp, out: ["calibrate", comp, "--train-data", DATA, "--samples", 5, "--out", out],
    "repair-remove": lambda base, comp, out: ["repair", "remove", comp, "--label", "Bag", "--out", out],
    "repair-replace": lambda base, comp, out: ["repair", "replace", comp, "--pair", "Trouser,Bag", "--better", base,
                                               "--out", out],
    "repair-reverify": lambda base, comp, out: ["repair", "reverify", comp, "--pair", "Trouser,Bag", "--pair-store",
                                                base, "--out", out],
    "compose": lambda base, comp, out: ["compose", f"{base}:Trouser", "--out", out],
    "decompose": lambda base, comp, out: ["decompose", MODEL, "--data", DATA, "--samples-per-class", 5, "--out", out],
    "train": lambda base, comp, out: ["train", "smallcnn", "--data", DATA, "--epochs", 1, "--limit-per-class", 5,
                                      "--out", out],
    "evaluate-report": lambda base, comp, out: ["evaluate", base, "--data", DATA, "--limit", 20, "--report", out],
    "tradeoff": lambda base, comp, out: ["tradeoff", base, "--data", DATA, "--limit", 20, "--rho", "0",
                                         "--granularity", "node", "--out", out],
    "reproduce": lambda base, comp, out: ["reproduce", "--out", out, "--only", "table6"],
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_no_writer_touches_a_folder_it_did_not_write(writer: str, overwrite: bool, base: Path, comp: Path,
                                                     work: Path) -> None:
    user = _user_dir(work)
    before = tree(user)
    run = run_main(*WRITERS[writer](base, comp, user), *(["--overwrite"] if overwrite else []))
    assert_refused(run, str(user))
    assert tree(user) == before


@pytest.mark.parametrize("writer", ["remove", "replace", "compose"])
def test_a_composition_writer_never_replaces_a_store(writer: str, base: Path, comp: Path, work: Path) -> None:
    keep = work / "keep"
    shutil.copytree(base, keep)
    before = tree(keep)
    for extra in ([], ["--overwrite"]):
        assert_refused(run_main(*WRITERS[writer](base, comp, keep), *extra), "keep")
        assert tree(keep) == before


def test_a_user_file_is_never_replaced(base: Path, work: Path) -> None:
    mine = work / "model.safetensors"
    mine.write_bytes(b"my own weights")
    assert_refused(run_main(*WRITERS["train"](base, base, mine), "--overwrite"), "not a cnnmod model")
    assert mine.read_bytes() == b"my own weights"


def test_demo_leaves_a_store_folder_it_did_not_write(work: Path) -> None:
    (work / "D" / "store").mkdir(parents=True)
    (work / "D" / "store" / "mine.txt").write_text("mine")
    assert_refused(run_main("demo", "--out", work / "D", "--samples-per-class", 5), "store")
    assert (work / "D" / "store" / "mine.txt").read_text() == "mine"


def test_overwrite_replaces_its_own_artefact_and_leaves_nothing_beside_it(base: Path, comp: Path,
                                                                          work: Path) -> None:
    out = work / "c"
    assert run_main("remove", comp, "Bag", "--out", out).code == 0
    assert run_main("remove", comp, "Trouser", "--out", out, "--overwrite").code == 0
    assert load_composition(out).labels == ("Bag",)
    assert sorted(p.name for p in work.iterdir()) == ["c"]


def test_a_swap_killed_between_renames_is_recovered(base: Path, work: Path) -> None:
    """Where the kernel cannot exchange two folders, the old store waits aside under a name of this process's;
    if the process dies there, the next load or write puts it back."""
    store = work / "s"
    shutil.copytree(base, store)
    aside = work / f".s.cnnmod-old-{_dead_pid()}-x1"
    os.rename(store, aside)  # what a kill between the two renames leaves
    assert load_store(store).modules.class_names == load_store(base).modules.class_names
    assert not aside.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(base: Path, work: Path) -> None:
    dead, live = work / f".s.cnnmod-tmp-{_dead_pid()}-ab", work / f".s.cnnmod-tmp-{os.getpid()}-cd"
    user = work / ".s.something-else"
    for folder in (dead, live, user):
        folder.mkdir()
    save_store(work / "s", load_store(base).modules)
    assert not dead.exists() and live.exists() and user.exists()


# -------------------------------------------------------------------------------- 2. silent wrong results


SILENT = {
    "decompose-batch-size-negative": ["decompose", MODEL, "--data", DATA, "--batch-size", -1, "--out", "{w}/n"],
    "decompose-batch-size-zero": ["decompose", MODEL, "--data", DATA, "--batch-size", 0, "--out", "{w}/n"],
    "evaluate-limit-zero": ["evaluate", "{base}", "--data", DATA, "--limit", 0],
    "evaluate-limit-negative": ["evaluate", "{base}", "--data", DATA, "--limit", -1],
    "evaluate-classes-twice": ["evaluate", "{base}", "--data", DATA, "--classes", "Bag,Bag"],
    "decompose-classes-twice": ["decompose", MODEL, "--data", DATA, "--classes", "Bag,Bag", "--out", "{w}/n"],
    "calibrate-samples-negative": ["calibrate", "{comp}", "--train-data", DATA, "--samples", -3, "--out", "{w}/n"],
    "train-lr-nan": ["train", "smallcnn", "--data", DATA, "--lr", "nan", "--out", "{w}/m.safetensors"],
    "train-lr-inf": ["train", "smallcnn", "--data", DATA, "--lr", "inf", "--out", "{w}/m.safetensors"],
    "decompose-tangling-nan": ["decompose", MODEL, "--data", DATA, "--tangling-ratio", "nan", "--out", "{w}/n"],
    "decompose-delta-nan": ["decompose", MODEL, "--data", DATA, "--delta", "nan", "--out", "{w}/n"],
    "decompose-rho-one": ["decompose", MODEL, "--data", DATA, "--rho", 1, "--out", "{w}/n"],
}


def _fill(args: list[object], base: Path, comp: Path, work: Path) -> list[str]:
    return [str(a).format(base=base, comp=comp, w=work) for a in args]


@pytest.mark.parametrize("case", sorted(SILENT))
def test_no_silent_wrong_result(case: str, base: Path, comp: Path, work: Path) -> None:
    assert_refused(run_main(*_fill(SILENT[case], base, comp, work)))
    assert not (work / "n").exists() and not (work / "m.safetensors").exists()


def test_a_class_without_test_images_has_no_recall_rather_than_zero(base: Path, work: Path) -> None:
    with np.load(DATA) as z:
        arrays = {k: z[k] for k in z.files}
    keep = arrays["y_test"] != 8  # no Bag in the test split
    arrays["x_test"], arrays["y_test"] = arrays["x_test"][keep], arrays["y_test"][keep]
    np.savez(work / "nobag.npz", **arrays)
    run = run_main("evaluate", base, "--data", work / "nobag.npz", "--json")
    assert run.code == 0, run.stderr
    bag = next(m for m in json.loads(run.stdout)["modules"] if m["class"] == "Bag")
    assert bag["recall"] is None and bag["parent_recall"] is None


def test_upscaled_images_are_said(base: Path, work: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 4, 4, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 4)
    np.savez(work / "tiny.npz", x_train=images, y_train=labels, x_test=images, y_test=labels,
             classes=np.array(load_store(base).modules.class_names))
    run = run_main("evaluate", base, "--data", work / "tiny.npz")
    assert run.code == 0 and "warning: images are 4x4; upscaled to the parent's 28x28" in run.stderr


def test_manifests_are_strict_json(base: Path) -> None:
    json.loads((base / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in manifest"))


# --------------------------------------------------------------------------------- 3. forged or edited stores


def _edit(store: Path, change: Callable[[dict], None], file: str = "manifest.json") -> None:
    manifest = json.loads((store / file).read_text())
    change(manifest)
    (store / file).write_text(json.dumps(manifest))


def _walk_set(obj: object, key: str, value: object) -> None:
    if isinstance(obj, dict):
        for k in obj:
            if k == key:
                obj[k] = value
            else:
                _walk_set(obj[k], key, value)
    elif isinstance(obj, list):
        for v in obj:
            _walk_set(v, key, value)


FORGERIES: dict[str, tuple[Callable[[dict], None], str]] = {
    "class-index-negative": (lambda m: m["modules"][0].update(class_index=-1), "class_index"),
    "class-index-out-of-range": (lambda m: m["modules"][0].update(class_index=10), "class_index"),
    "class-index-duplicate": (lambda m: m["modules"][1].update(class_index=m["modules"][0]["class_index"],
                                                               **{"class": m["modules"][0]["class"]}), "class_index"),
    "class-index-string": (lambda m: m["modules"][0].update(class_index="0"), "class_index"),
    "class-index-bool": (lambda m: m["modules"][0].update(class_index=True), "class_index"),
    "class-name-mismatch": (lambda m: m["modules"][0].update(**{"class": "Bag"}), "class"),
    "parent-classes-duplicate": (lambda m: m["parent"]["classes"].__setitem__(1, m["parent"]["classes"][0]),
                                 "classes"),
    "parent-classes-million": (lambda m: m["parent"].update(classes=[f"c{i}" for i in range(10**6)]), "classes"),
    "parent-classes-too-few": (lambda m: m["parent"].update(classes=m["parent"]["classes"][:9]), "classes"),
    "std-zero": (lambda m: m["parent"]["input_spec"].update(std=[0]), "std"),
    "mean-wrong-length": (lambda m: m["parent"]["input_spec"].update(mean=[0.5, 0.5, 0.5]), "mean"),
    "input-size-negative": (lambda m: m["parent"]["input_spec"].update(size=[-5, 28]), "size"),
    "input-size-huge": (lambda m: m["parent"]["input_spec"].update(size=[10**9, 28]), "size"),
    "channels-string": (lambda m: m["parent"]["input_spec"].update(channels="1"), "channels"),
    "only-some-sites": (lambda m: m.update(sites=m["sites"][:1]), "sites"),
    "sha256-null": (lambda m: _walk_set(m, "sha256", None), "sha256"),
    "sha256-int": (lambda m: m["modules"][0].update(sha256=12345), "sha256"),
    "sha256-missing": (lambda m: m["modules"][0].pop("sha256"), "sha256"),
    "file-outside": (lambda m: m["modules"][0].update(file="../base/modules/0000.safetensors"), "file"),
    "file-absolute": (lambda m: m["modules"][0].update(file="/etc/passwd"), "file"),
    "modules-not-a-list": (lambda m: m.update(modules={"0": 1}), "modules"),
    "modules-empty": (lambda m: m.update(modules=[]), "modules"),
    "config-a-list": (lambda m: m.update(config=[]), "config"),
    "version-string": (lambda m: m.update(version="2"), "version"),
    "parent-missing": (lambda m: m.pop("parent"), "parent"),
    "jaccard-string": (lambda m: m["modules"][0].update(jaccard="x"), "jaccard"),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_an_edited_store_manifest_is_refused_naming_the_field(case: str, base: Path, work: Path) -> None:
    store = work / "forged"
    shutil.copytree(base, store)
    change, field = FORGERIES[case]
    _edit(store, change)
    with pytest.raises(StoreError, match=field):
        load_store(store)
    assert_refused(run_main("evaluate", store, "--data", DATA, "--limit", 10))


def test_modules_are_bound_to_the_parent_they_were_made_from(base: Path, work: Path) -> None:
    """A parent of the same architecture with other weights, and its whole manifest block, is not enough."""
    other = work / "other"
    run = run_main("train", "smallcnn", "--data", DATA, "--epochs", 1, "--limit-per-class", 5, "--out",
                   work / "other.safetensors")
    assert run.code == 0, run.stderr
    assert run_main("decompose", work / "other.safetensors", "--data", DATA, "--samples-per-class", 5,
                    "--out", other).code == 0
    forged = work / "forged"
    shutil.copytree(base, forged)
    shutil.copy(other / "parent.safetensors", forged / "parent.safetensors")
    parent_block = json.loads((other / "manifest.json").read_text())["parent"]
    _edit(forged, lambda m: m.update(parent=parent_block))
    with pytest.raises(StoreError, match="another parent"):
        load_store(forged)


COMPOSITION_FORGERIES: dict[str, tuple[Callable[[dict], None], str]] = {
    "group-outside": (lambda m: m["groups"][0].update(store="../base"), "store"),
    "group-absolute": (lambda m: m["groups"][0].update(store="/tmp"), "store"),
    "reverifier-unknown-labels": (lambda m: m.update(reverifiers=[{"store": "reverify0", "labels": ["x", "y"]}]),
                                  "reverifiers"),
    "labels-wrong-count": (lambda m: m["groups"][0].update(labels=["Trouser"]), "labels"),
    "scoring-unknown": (lambda m: m.update(scoring="vote"), "scoring"),
    "labels-duplicate": (lambda m: m["groups"][0].update(labels=["Bag", "Bag"]), "label"),
}


@pytest.mark.parametrize("case", sorted(COMPOSITION_FORGERIES))
def test_an_edited_composition_manifest_is_refused(case: str, comp: Path, work: Path) -> None:
    forged = work / "forged"
    shutil.copytree(comp, forged)
    shutil.copytree(comp / "group0", forged / "reverify0")
    change, field = COMPOSITION_FORGERIES[case]
    _edit(forged, change)
    with pytest.raises(StoreError, match=field):
        load_composition(forged)


def test_a_composition_group_linked_outside_its_folder_is_refused(base: Path, comp: Path, work: Path) -> None:
    forged = work / "forged"
    shutil.copytree(comp, forged)
    shutil.rmtree(forged / "group0")
    (forged / "group0").symlink_to(base)
    with pytest.raises(StoreError, match="not a store folder inside"):
        load_composition(forged)


# ------------------------------------------------------------------------------ 4. one line, no traceback


TRACEBACKS = {
    "garbage-th": ["decompose", "{w}/garbage.th", "--arch", "resnet20", "--data", DATA, "--out", "{w}/n"],
    "garbage-th-inspect": ["inspect", "{w}/garbage.th", "--arch", "resnet20"],
    "device-cuda-absent": ["evaluate", "{base}", "--data", DATA, "--device", "cuda:7"],
    "device-foo": ["evaluate", "{base}", "--data", DATA, "--device", "foo"],
    "seed-negative": ["decompose", MODEL, "--data", DATA, "--seed", -1, "--out", "{w}/n"],
    "evaluate-batch-negative": ["evaluate", "{base}", "--data", DATA, "--batch-size", -1],
    "tangling-inf": ["decompose", MODEL, "--data", DATA, "--tangling-ratio", "inf", "--out", "{w}/n"],
    "input-size-negative": ["decompose", "{w}/garbage.th", "--arch", "resnet20", "--input-size", -5, "--data", DATA,
                            "--out", "{w}/n"],
    "tradeoff-rho-comma": ["tradeoff", "{base}", "--data", DATA, "--rho", ","],
    "tradeoff-rho-word": ["tradeoff", "{base}", "--data", DATA, "--rho", "0,x"],
    "train-epochs-zero": ["train", "smallcnn", "--data", DATA, "--epochs", 0, "--out", "{w}/m.safetensors"],
    "train-batch-zero": ["train", "smallcnn", "--data", DATA, "--batch-size", 0, "--out", "{w}/m.safetensors"],
    "train-val-fraction": ["train", "smallcnn", "--data", DATA, "--val-fraction", 1.5, "--out", "{w}/m.safetensors"],
    "out-under-a-file": ["decompose", MODEL, "--data", DATA, "--out", "{w}/afile/store"],
    "out-dot-overwrite": ["decompose", MODEL, "--data", DATA, "--out", ".", "--overwrite"],
    "out-dotdot-overwrite": ["decompose", MODEL, "--data", DATA, "--out", "..", "--overwrite"],
    "unknown-command": ["frobnicate"],
    "unknown-option": ["evaluate", "{base}", "--data", DATA, "--frob"],
    "missing-data": ["evaluate", "{base}", "--data", "{w}/nope.npz"],
    "unknown-class": ["evaluate", "{base}", "--data", DATA, "--classes", "Unicorn"],
    "not-a-store": ["evaluate", "{w}", "--data", DATA],
}


@pytest.mark.parametrize("case", sorted(TRACEBACKS))
def test_a_user_error_is_one_line(case: str, base: Path, work: Path) -> None:
    (work / "garbage.th").write_bytes(os.urandom(300))
    (work / "afile").write_text("x")
    (work / "sub").mkdir()
    assert_refused(run_main(*_fill(TRACEBACKS[case], base, base, work), cwd=work / "sub" if "dot" in case else None))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("flag", ["--out", "--report"])
def test_a_read_only_destination_is_refused_before_the_work(flag: str, base: Path, work: Path) -> None:
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        args = (["decompose", MODEL, "--data", DATA, "--out", locked / "s"] if flag == "--out" else
                ["evaluate", base, "--data", DATA, "--report", locked / "r"])
        assert_refused(run_main(*args), "not writable")
    finally:
        locked.chmod(0o700)


def test_a_destination_that_cannot_be_written_is_refused_before_the_work(work: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check as a read-only folder, where the test runs as root (which may write anywhere)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == work else real_access(p, mode))
    with pytest.raises(OutputError, match="not writable"):
        check_output(work / "s", "store", False)


def test_a_full_disk_is_one_line_and_leaves_no_temporaries(base: Path, work: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def full(*args: object, **kwargs: object) -> None:
        raise safetensors.SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(StoreError, match="No space left"):
        save_store(work / "s", load_store(base).modules)
    assert list(work.iterdir()) == []


def test_ctrl_c_at_any_moment_is_one_line(tmp_path: Path) -> None:
    """SIGINT at several moments of a real `cnnmod` process, from the first import on: never a traceback."""
    for delay in (0.05, 0.3, 0.8, 1.5, 2.5):
        child = subprocess.Popen([sys.executable, "-m", "cnnmod", "decompose", str(MODEL), "--data", str(DATA),
                                  "--out", str(tmp_path / f"s{delay}")], stderr=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, text=True)
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        assert "Traceback" not in err, f"after {delay}s: {err}"
        if child.returncode != 0:  # -SIGINT: killed while the interpreter itself was starting, before any code ran
            assert child.returncode in (130, -signal.SIGINT), (delay, child.returncode, err)
            lines = err.strip().splitlines()  # what the command said before (its memory estimate), then one line
            assert not lines or lines[-1] == "interrupted", (delay, err)
            assert all(line.startswith("memory: ") for line in lines[:-1]), (delay, err)


def _python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_ctrl_c_during_an_import_waits_for_the_import(tmp_path: Path) -> None:
    """Python cannot raise KeyboardInterrupt out of importlib's callbacks (it prints "Exception ignored ...
    Traceback"); the command's handler holds the signal until the import is done, then raises it."""
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
        "for _ in range(30):\n    time.sleep(0.01)\ndone = True\n")
    script = (f"import sys, time\nsys.path.insert(0, {str(tmp_path)!r})\n"
              "from cnnmod.cli.interrupt import install\ninstall()\n"
              "try:\n    import slow_module\n    time.sleep(5)\n    print('not interrupted')\n"
              "except KeyboardInterrupt:\n    print('after import' if sys.modules['slow_module'].done else 'inside')\n")
    run = _python(script)
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, "after import", "")


def test_ctrl_c_while_an_object_with_a_finaliser_is_built_waits_for_it() -> None:
    """The CI failure of stop 22: SIGINT inside zipfile.ZipFile.__init__ left a half-built archive whose __del__
    printed a traceback. The handler holds the signal until such an __init__ returns."""
    script = ("import os, signal, sys, time\n"
              "from cnnmod.cli.interrupt import install\ninstall()\n"
              "class Archive:\n"
              "    def __init__(self):\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n"
              "        for _ in range(30):\n            time.sleep(0.01)\n"
              "        self.ready = True\n"
              "    def __del__(self):\n        self.ready\n"
              "try:\n    archive = Archive()\n    time.sleep(5)\n    print('not interrupted')\n"
              "except KeyboardInterrupt:\n    print('built' if 'archive' in dir() else 'half-built')\n")
    run = _python(script)
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, "built", "")


def test_a_finaliser_that_fails_after_ctrl_c_is_not_reported() -> None:
    """Objects a Ctrl-C cut short are freed as the command ends; their finalisers' errors are not the user's."""
    script = ("import os, signal, time\n"
              "from cnnmod.cli.interrupt import install\ninstall()\n"
              "class Broken:\n    def __del__(self):\n        raise AttributeError('_writing')\n"
              "def work():\n    broken = Broken()\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\n"
              "try:\n    work()\nexcept KeyboardInterrupt:\n    print('interrupted')\n")
    run = _python(script)
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, "interrupted", "")
    reported = _python(script.replace("os.kill(os.getpid(), signal.SIGINT)", "raise KeyboardInterrupt"))
    assert "Exception ignored" in reported.stderr  # an interrupt that did not come through the handler: reported


# ---------------------------------------------------------------------------- 5. permissions and leftovers


def test_files_and_folders_get_the_umask(base: Path, comp: Path, work: Path) -> None:
    old = os.umask(0o022)
    try:
        store, model = work / "s", work / "m.safetensors"
        save_store(store, load_store(base).modules)
        assert run_main(*WRITERS["train"](base, comp, model)).code == 0
    finally:
        os.umask(old)
    for path in [store, *store.rglob("*"), model]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_overwriting_a_file_leaves_nothing_beside_it(work: Path) -> None:
    from cnnmod.storage.outputs import register_kind

    register_kind("test-note", folder=False, recognise=lambda p: p.is_file() and p.read_bytes().startswith(b"NOTE"))
    target = work / "a.note"
    for text in (b"NOTE 1", b"NOTE 2"):
        write_file(target, "test-note", lambda tmp, text=text: tmp.write_bytes(text), overwrite=True)
    assert target.read_bytes() == b"NOTE 2" and [p.name for p in work.iterdir()] == ["a.note"]


def test_a_failed_write_leaves_the_old_artefact_and_no_temporaries(base: Path, work: Path) -> None:
    store = work / "s"
    shutil.copytree(base, store)
    before = tree(store)
    with pytest.raises(RuntimeError), write_folder(store, "store", overwrite=True) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert tree(store) == before and [p.name for p in work.iterdir()] == ["s"]


def test_tradeoff_writes_nothing_into_the_store(base: Path, work: Path) -> None:
    store = work / "s"
    shutil.copytree(base, store)
    before = tree(store)
    run = run_main("tradeoff", store, "--data", DATA, "--limit", 20, "--rho", "0", "--granularity", "node")
    assert run.code == 0, run.stderr
    assert tree(store) == before


# ------------------------------------------------------------------------------------------- 6. messages


def test_a_truncated_model_file_is_called_damaged(work: Path) -> None:
    cut = work / "cut.safetensors"
    cut.write_bytes(MODEL.read_bytes()[:5000])
    run = run_main("decompose", cut, "--data", DATA, "--out", work / "s")
    assert_refused(run)
    assert "plain checkpoint" not in run.stderr


@pytest.mark.parametrize("method", [[], ["--method", "paper"], ["--method", "compact"]])
def test_a_class_without_samples_is_named(work: Path, method: list[str]) -> None:
    with np.load(DATA) as z:
        arrays = {k: z[k] for k in z.files}
    keep = arrays["y_train"] != 3
    arrays["x_train"], arrays["y_train"] = arrays["x_train"][keep], arrays["y_train"][keep]
    np.savez(work / "nodress.npz", **arrays)
    assert_refused(run_main("decompose", MODEL, "--data", work / "nodress.npz", "--out", work / "s", *method),
                   "'Dress'")
    assert not (work / "s").exists()


@pytest.mark.parametrize("size, channels, mean, std", [
    ((0, 28), 1, (0.5,), (0.5,)), ((28, 28), 1, (0.5,), (0.0,)), ((28, 28), 3, (0.5,), (0.5,)),
    ((28, 28), 1, (float("nan"),), (0.5,)), ((28, 28), 0, (), ()), ((10**6, 28), 1, (0.5,), (0.5,)),
])
def test_an_input_spec_that_is_not_one_is_refused_wherever_it_comes_from(size: tuple[int, int], channels: int,
                                                                          mean: tuple[float, ...],
                                                                          std: tuple[float, ...]) -> None:
    from cnnmod.engine.inputs import InputSpec

    with pytest.raises(ValueError):
        InputSpec(size, channels, mean, std)


# ---------------------------------------------------------------------------- 6. damaged model files


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A ResNet-8 as each kind of file a user hands in: exported program, zip and legacy checkpoints, safetensors."""
    import safetensors.torch

    from cnnmod.zoo import create_model

    folder = tmp_path_factory.mktemp("models")
    model = create_model("resnet8", num_classes=10, seed=0).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), folder / "m.pt2")
    torch.save(model.state_dict(), folder / "m.th")
    torch.save(model.state_dict(), folder / "legacy.th", _use_new_zipfile_serialization=False)
    safetensors.torch.save_file(model.state_dict(), str(folder / "m.safetensors"))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_damaged_model_file_is_one_line(model_files: dict[str, bytes], work: Path,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    """Real model files, truncated or with bytes overwritten (zip directories, pickles, headers): `inspect` refuses
    each in one line, and nothing that torch logs on its own reaches the terminal as a traceback."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=st.sampled_from(sorted(model_files)), cut=st.floats(0.0, 1.0),
           edits=st.lists(st.tuples(st.booleans(), st.floats(0.0, 1.0), st.integers(0, 255)), max_size=60))
    def damaged(name: str, cut: float, edits: list[tuple[bool, float, int]]) -> None:
        data = bytearray(model_files[name])
        start = data.find(b"PK\x01\x02")  # a zip's central directory (names, versions, offsets), else the last 3%
        start = start if start >= 0 else int(0.97 * len(data))
        for in_directory, where, value in edits:
            low = start if in_directory else 0
            data[low + int(where * (len(data) - 1 - low))] = value
        if not edits or cut < 0.5:
            data = data[: int(cut * len(data))]
        path = work / name
        path.write_bytes(bytes(data))
        run = run_main("inspect", path, *([] if name.endswith(".pt2") else ["--arch", "resnet8"]))
        if run.code != 0:
            assert_refused(run)
        assert "Traceback" not in capfd.readouterr().err

    damaged()


def test_a_report_without_matplotlib_is_refused_before_the_work(base: Path, work: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [report] extra were not installed
    run = run_main("evaluate", base, "--data", DATA, "--report", work / "r")
    assert_refused(run, "needs matplotlib", "cnnmod[report]")
    assert not (work / "r").exists() and "top-1" not in run.stdout
