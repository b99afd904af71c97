"""Build ``mnist_sample.npz`` (first 16 MNIST test digits, uint8, with labels).

Usage: python problems/data/build_sample.py [path/to/mnist folder]
(default: ../shared/data/mnist relative to the repository root).
MNIST: Y. LeCun, C. Cortes, C. J. C. Burges, CC BY-SA 3.0.
"""

import sys
from pathlib import Path

import numpy as np

from problems.datasets import MNIST_IMAGES, load_mnist, load_mnist_labels

COUNT = 16


def main() -> None:
    here = Path(__file__).resolve().parent
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else here.parents[1] / "../shared/data/mnist"
    images = load_mnist(source / MNIST_IMAGES, count=COUNT)
    labels = load_mnist_labels(source / "t10k-labels-idx1-ubyte.gz", count=COUNT)
    out = here / "mnist_sample.npz"
    credit = "MNIST test set, first 16 digits; Y. LeCun, C. Cortes, C. J. C. Burges; CC BY-SA 3.0"
    np.savez_compressed(out, images=np.rint(images * 255.0).astype(np.uint8), labels=labels,
                        credit=np.array(credit))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
