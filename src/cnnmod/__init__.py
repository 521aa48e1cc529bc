"""cnnmod: decompose a trained CNN classifier into per-class modules and build classifiers from them.

The public names below are imported on first use, so that `import cnnmod` (and the command line, which must
answer Ctrl-C cleanly from its first instruction) does not wait for torch.
"""

from __future__ import annotations

import importlib
import sys
import types

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (this file must import fast)

__version__ = "0.1.0"

_EXPORTS = {
    "Calibration": "calibrate", "calibrate": "calibrate",
    "ComposedClassifier": "compose", "compose": "compose",
    "CompactConfig": "compact", "decompose_compact": "compact",
    "Dataset": "data", "ImageSet": "data", "load_dataset": "data",
    "DecomposeConfig": "decompose", "decompose": "decompose", "derive_modules": "decompose", "observe": "decompose",
    "CnnmodError": "errors", "DataError": "errors", "ModelError": "errors", "StoreError": "errors",
    "TraceError": "errors",
    "Evaluation": "evaluate", "evaluate": "evaluate",
    "InputSpec": "inputs",
    "ModuleSet": "modules", "Parent": "modules",
    "Store": "store", "load_composition": "store", "load_store": "store", "save_composition": "store",
    "save_store": "store",
}

__all__ = [
    "Calibration", "CnnmodError", "CompactConfig", "ComposedClassifier", "DataError", "Dataset", "DecomposeConfig",
    "Evaluation", "ImageSet", "InputSpec", "ModelError", "ModuleSet", "Parent", "Store", "StoreError", "TraceError",
    "calibrate", "compose", "decompose", "decompose_compact", "derive_modules", "evaluate", "load_composition",
    "load_dataset", "load_store", "observe", "save_composition", "save_store",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cnnmod' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cnnmod.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package; for `decompose`, `compose`, `evaluate` and `calibrate`
    that would hide the function of the same name, so that binding is skipped (the submodule stays reachable
    through sys.modules and `from cnnmod.decompose import ...`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if _EXPORTS.get(name) == name and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from typing import Any

    from .calibrate import Calibration, calibrate
    from .compact import CompactConfig, decompose_compact
    from .compose import ComposedClassifier, compose
    from .data import Dataset, ImageSet, load_dataset
    from .decompose import DecomposeConfig, decompose, derive_modules, observe
    from .errors import CnnmodError, DataError, ModelError, StoreError, TraceError
    from .evaluate import Evaluation, evaluate
    from .inputs import InputSpec
    from .modules import ModuleSet, Parent
    from .store import Store, load_composition, load_store, save_composition, save_store
