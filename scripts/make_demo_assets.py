"""Rebuild the demo's embedded assets: a Fashion-MNIST sample and the small CNN `cnnmod train` trained on it.

Needs Fashion-MNIST (`apt-get install -y dataset-fashion-mnist`). Run from the repository root:
    python scripts/make_demo_assets.py
"""

import subprocess
import sys
from pathlib import Path

import numpy as np

from cnnmod.data import load_dataset

SOURCE = Path("/usr/share/datasets/fashion-mnist")
ASSETS = Path("src/cnnmod/assets")
TRAIN_PER_CLASS, TEST_PER_CLASS, EPOCHS = 200, 100, 12


def sample(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in range(int(labels.max()) + 1)]))


def main() -> None:
    data = load_dataset(SOURCE, format="idx")
    rng = np.random.default_rng(0)
    tr, te = sample(data.train.labels, TRAIN_PER_CLASS, rng), sample(data.test.labels, TEST_PER_CLASS, rng)
    np.savez_compressed(ASSETS / "fmnist-sample.npz", x_train=data.train.images[tr], y_train=data.train.labels[tr],
                        x_test=data.test.images[te], y_test=data.test.labels[te], classes=np.array(data.classes))
    subprocess.run([sys.executable, "-m", "cnnmod", "train", "smallcnn", "--data", str(SOURCE), "--epochs",
                    str(EPOCHS), "--out", str(ASSETS / "smallcnn-fmnist.safetensors")], check=True)


if __name__ == "__main__":
    main()
