"""Errors that cnnmod reports to the user as one line."""


class CnnmodError(Exception):
    """Base class: the message is one line that names what is wrong and what to do."""


class DataError(CnnmodError):
    """A dataset path, format or class selection that cannot be read."""


class TraceError(CnnmodError):
    """A model that torch.fx cannot trace, or that holds a layer cnnmod cannot decompose."""


class StoreError(CnnmodError):
    """A store or model file that is missing, corrupt, or does not match what it claims."""


class ModelError(CnnmodError):
    """An unknown architecture, or a checkpoint that does not fit it."""
