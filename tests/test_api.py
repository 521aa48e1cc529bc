"""The public API: every name in cnnmod.__all__ resolves, to the function (not the submodule of the same name),
and `import cnnmod` does not import torch (so the command line answers Ctrl-C from its first instruction)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import cnnmod  # noqa: F401  (the package itself is under test)


def test_every_public_name_resolves_to_what_it_names() -> None:
    import cnnmod.engine.compose
    import cnnmod.engine.decompose
    import cnnmod.workflows.calibrate
    import cnnmod.workflows.evaluate  # noqa: F401  (binding these submodules must not hide the functions)

    for name in cnnmod.__all__:
        value = getattr(cnnmod, name)
        assert inspect.isfunction(value) or inspect.isclass(value), (name, value)
    from cnnmod import calibrate, compose, decompose, evaluate

    assert all(inspect.isfunction(f) for f in (calibrate, compose, decompose, evaluate))


def test_importing_cnnmod_and_its_cli_does_not_import_torch() -> None:
    code = "import sys, cnnmod, cnnmod.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
