"""Dataset loaders (host NumPy): MNIST IDX files, BSDS300 JPEG crops, the embedded sample.

MNIST: Y. LeCun, C. Cortes and C. J. C. Burges, licensed CC BY-SA 3.0; the first digits of
its test set ship with this package as ``problems/data/mnist_sample.npz``.
BSDS300: D. Martin, C. Fowlkes, D. Tal and J. Malik (ICCV 2001), research use; not shipped.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IDX_IMAGE_MAGIC = 2051
IDX_LABEL_MAGIC = 2049


def _read_idx(path: str | Path, magic: int, count: int | None, start: int) -> np.ndarray:
    """Items [start, start + count) of an IDX file (gzip or raw) as uint8 (count, ...): a
    big-endian uint32 header (``magic``, N, then the item's dimensions: magic 2051 images
    (N, rows, cols), 2049 labels (N,)) followed by uint8 data."""
    data = Path(path).read_bytes()  # FileNotFoundError names the path
    if data[:2] == b"\x1f\x8b":  # gzip
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"cannot read {path}: corrupt or truncated file ({exc})") from exc
    kind = "image" if magic == IDX_IMAGE_MAGIC else "label"
    header = 4 * (1 + magic - 2048)  # the last byte of the magic is the number of dimensions
    if len(data) < header:
        raise ValueError(f"{path} is not an IDX {kind} file: only {len(data)} bytes")
    found, total, *shape = (int(v) for v in np.frombuffer(data[:header], dtype=">u4"))
    if found != magic:
        raise ValueError(f"{path} is not an IDX {kind} file: magic {found}, expected {magic}")
    size = math.prod(shape)
    if len(data) != header + total * size:
        raise ValueError(
            f"{path} is corrupt: header announces {'×'.join(map(str, [total, *shape]))} items "
            f"but the file holds {len(data) - header} bytes of data"
        )
    count = total - start if count is None else count
    if not 0 <= start <= start + count <= total:
        raise ValueError(f"start={start}, count={count} exceed the {total} items of {path}")
    items = np.frombuffer(data, dtype=np.uint8, count=count * size, offset=header + start * size)
    return items.reshape(count, *shape)


MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"  # the MNIST test images, in a data folder


def load_mnist(path: str | Path, *, count: int | None = None, start: int = 0) -> np.ndarray:
    """Read an IDX image file (gzip or raw): float64 in [0, 1] of shape (N, rows, cols);
    ``start`` / ``count`` select images [start, start + count)."""
    return _read_idx(path, IDX_IMAGE_MAGIC, count, start).astype(np.float64) / 255.0


def load_mnist_labels(path: str | Path, *, count: int | None = None, start: int = 0) -> np.ndarray:
    """Read an IDX label file (gzip or raw): uint8 labels of shape (N,)."""
    return _read_idx(path, IDX_LABEL_MAGIC, count, start).copy()


def images_spanned(samples_end: int, per_image: int) -> int:
    """How many images samples 0 … samples_end − 1 come from, ``per_image`` crops each."""
    return -(-samples_end // per_image)


def load_bsds300(
    root: str | Path,
    split: str = "train",
    *,
    crop: int = 64,
    count: int | None = None,
    seed: int = 0,
    per_image: int = 1,
) -> np.ndarray:
    """Grayscale crops (count · per_image, crop, crop) in [0, 1] from BSDS300
    ``root/images/{split}``: image i in sorted file-name order gets ``per_image`` crops
    (rows i·per_image + j), their corners drawn in turn by
    ``numpy.random.default_rng([seed, i])`` (so crop 0 of an image is the same whatever
    ``per_image``); ``count`` counts images."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got split={split!r}")
    folder = Path(root) / "images" / split
    files = sorted(folder.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no .jpg files in {folder} (BSDS300 holds images/{split})")
    if count is not None and not 0 <= count <= len(files):
        raise ValueError(f"count={count} but {folder} holds {len(files)} images")
    if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
        raise ValueError(f"per_image must be an integer >= 1; got {per_image!r}")
    files = files[:count]
    crops = np.empty((len(files) * per_image, crop, crop))
    for i, path in enumerate(files):
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
        except OSError as exc:
            raise ValueError(f"cannot decode image {path}: {exc}") from exc
        gray = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma
        h, w = gray.shape
        if crop > min(h, w):
            raise ValueError(f"crop={crop} is larger than image {path} ({h}×{w})")
        rng = np.random.default_rng([seed, i])
        for j in range(per_image):
            r = int(rng.integers(0, h - crop + 1))
            c = int(rng.integers(0, w - crop + 1))
            crops[i * per_image + j] = gray[r : r + crop, c : c + crop]
    return crops


@dataclass(frozen=True)
class MnistSample:
    """The embedded MNIST digits: images float64 (N, 28, 28) in [0, 1] and labels (N,)."""

    images: np.ndarray
    labels: np.ndarray


def load_embedded_mnist() -> MnistSample:
    """The first MNIST test digits shipped in ``problems/data/mnist_sample.npz``."""
    with np.load(Path(__file__).resolve().parent / "data" / "mnist_sample.npz") as data:
        return MnistSample(data["images"].astype(np.float64) / 255.0, data["labels"].copy())
