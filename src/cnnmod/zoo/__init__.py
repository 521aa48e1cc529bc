"""Architectures by name, and weights on disk.

``import cnnmod.zoo`` imports no architecture; each is imported the first time ``create_model`` needs it.
"""

from cnnmod.zoo.checkpoints import (
    ModelFileInfo,
    load_model_file,
    load_weights,
    read_model_file_info,
    save_model_file,
)
from cnnmod.zoo.registry import ModelInfo, arch_of, create_model, list_models, model_info, register

__all__ = [
    "ModelFileInfo",
    "ModelInfo",
    "arch_of",
    "create_model",
    "list_models",
    "load_model_file",
    "load_weights",
    "model_info",
    "read_model_file_info",
    "register",
    "save_model_file",
]
