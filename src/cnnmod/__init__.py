"""cnnmod: decompose a trained CNN classifier into per-class modules and build classifiers from them."""

__version__ = "0.1.0"
