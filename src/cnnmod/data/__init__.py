"""Dataset readers (npz, image folders, CIFAR python, Tiny-ImageNet, idx) with a cache of decoded arrays."""

from cnnmod.data.detect import FORMATS, detect_format
from cnnmod.data.imageset import Dataset, ImageSet
from cnnmod.data.load import load_dataset
from cnnmod.data.tinyimagenet import tiny_imagenet_words

__all__ = ["FORMATS", "Dataset", "ImageSet", "detect_format", "load_dataset", "tiny_imagenet_words"]
