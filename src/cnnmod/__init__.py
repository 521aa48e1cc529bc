"""cnnmod: decompose a trained CNN classifier into per-class modules and build classifiers from them.

The public names below are imported on first use, so that `import cnnmod` (and the command line, which must
answer Ctrl-C cleanly from its first instruction) does not wait for torch.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (this file must import fast)

__version__ = "0.1.0"

_EXPORTS = {
    "ComposedClassifier": "engine.compose", "compose": "engine.compose",
    "CompactConfig": "engine.compact", "decompose_compact": "engine.compact",
    "DecomposeConfig": "engine.decompose", "decompose": "engine.decompose", "derive_modules": "engine.decompose",
    "observe": "engine.decompose",
    "InputSpec": "engine.inputs",
    "ModuleSet": "engine.modules", "Parent": "engine.modules",
    "Store": "storage.store", "load_composition": "storage.store", "load_store": "storage.store",
    "save_composition": "storage.store", "save_store": "storage.store",
    "Calibration": "workflows.calibrate", "calibrate": "workflows.calibrate",
    "Evaluation": "workflows.evaluate", "evaluate": "workflows.evaluate",
    "Dataset": "data", "ImageSet": "data", "load_dataset": "data",
    "CnnmodError": "errors", "DataError": "errors", "ModelError": "errors", "StoreError": "errors",
    "TraceError": "errors",
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


if TYPE_CHECKING:
    from typing import Any

    from .data import Dataset, ImageSet, load_dataset
    from .engine.compact import CompactConfig, decompose_compact
    from .engine.compose import ComposedClassifier, compose
    from .engine.decompose import DecomposeConfig, decompose, derive_modules, observe
    from .engine.inputs import InputSpec
    from .engine.modules import ModuleSet, Parent
    from .errors import CnnmodError, DataError, ModelError, StoreError, TraceError
    from .storage.store import Store, load_composition, load_store, save_composition, save_store
    from .workflows.calibrate import Calibration, calibrate
    from .workflows.evaluate import Evaluation, evaluate
