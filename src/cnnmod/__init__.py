"""cnnmod: decompose a trained CNN classifier into per-class modules and build classifiers from them."""

__version__ = "0.1.0"

from .calibrate import Calibration, calibrate
from .compose import ComposedClassifier, compose
from .data import Dataset, ImageSet, load_dataset
from .decompose import DecomposeConfig, decompose, derive_modules, observe
from .errors import CnnmodError, DataError, ModelError, StoreError, TraceError
from .evaluate import Evaluation, evaluate
from .inputs import InputSpec
from .modules import ModuleSet, Parent
from .store import Store, load_composition, load_store, save_composition, save_store

__all__ = [
    "Calibration", "CnnmodError", "ComposedClassifier", "DataError", "Dataset", "DecomposeConfig", "Evaluation",
    "ImageSet", "InputSpec", "ModelError", "ModuleSet", "Parent", "Store", "StoreError", "TraceError", "calibrate",
    "compose", "decompose", "derive_modules", "evaluate", "load_composition", "load_dataset", "load_store",
    "observe", "save_composition", "save_store",
]
