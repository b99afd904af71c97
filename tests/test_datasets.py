"""Dataset loaders: IDX parsing, error messages, BSDS300 crops, the embedded MNIST sample."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from problems.datasets import (
    load_bsds300,
    load_embedded_mnist,
    load_mnist,
    load_mnist_labels,
)


def write_idx(path: Path, images: np.ndarray, *, compress: bool) -> Path:
    header = np.array([2051, *images.shape], dtype=">u4").tobytes()
    payload = header + images.astype(np.uint8).tobytes()
    if compress:
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


@pytest.mark.parametrize("compress", [True, False])
def test_load_mnist_synthetic(tmp_path: Path, compress: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    path = write_idx(tmp_path / "imgs.idx", images, compress=compress)
    out = load_mnist(path)
    assert out.dtype == np.float64 and out.shape == (5, 4, 3)
    np.testing.assert_array_equal(out, images / 255.0)
    np.testing.assert_array_equal(load_mnist(path, count=2, start=1), images[1:3] / 255.0)
    with pytest.raises(ValueError, match="count=9"):
        load_mnist(path, count=9)


def test_load_mnist_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope-images.gz"
    with pytest.raises(FileNotFoundError, match="nope-images.gz"):
        load_mnist(missing)
    images = np.zeros((3, 2, 2), dtype=np.uint8)
    truncated = tmp_path / "truncated.idx"
    full = write_idx(tmp_path / "full.idx", images, compress=False)
    truncated.write_bytes(full.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated.idx"):
        load_mnist(truncated)
    wrong_magic = tmp_path / "labels.idx"
    wrong_magic.write_bytes(np.array([2049, 3, 0, 0], dtype=">u4").tobytes() + bytes(3))
    with pytest.raises(ValueError, match=r"labels.idx.*magic"):
        load_mnist(wrong_magic)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(ValueError, match="broken.gz"):
        load_mnist(broken_gz)


def test_embedded_mnist_sample() -> None:
    sample = load_embedded_mnist()
    assert sample.images.shape == (16, 28, 28) and sample.labels.shape == (16,)
    assert sample.images.dtype == np.float64
    assert 0.0 <= sample.images.min() and sample.images.max() <= 1.0
    assert sample.labels[:4].tolist() == [7, 2, 1, 0]  # the well-known first test digits


def test_embedded_sample_matches_full_file(shared_data: Path) -> None:
    folder = shared_data / "mnist"
    full = load_mnist(folder / "t10k-images-idx3-ubyte.gz", count=16)
    labels = load_mnist_labels(folder / "t10k-labels-idx1-ubyte.gz", count=16)
    sample = load_embedded_mnist()
    np.testing.assert_array_equal(sample.images, full)
    np.testing.assert_array_equal(sample.labels, labels)
    later = load_mnist(folder / "t10k-images-idx3-ubyte.gz", count=2, start=9998)
    assert later.shape == (2, 28, 28)


def make_jpegs(root: Path, count: int) -> None:
    pil = pytest.importorskip("PIL.Image")
    folder = root / "images" / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        rgb = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
        pil.fromarray(rgb).save(folder / f"{i:03d}.jpg", quality=95)


def test_bsds300_synthetic_crops(tmp_path: Path) -> None:
    make_jpegs(tmp_path, 3)
    crops = load_bsds300(tmp_path, "train", crop=16, count=2, seed=4)
    assert crops.shape == (2, 16, 16) and crops.dtype == np.float64
    assert 0.0 <= crops.min() and crops.max() <= 1.0
    np.testing.assert_array_equal(crops, load_bsds300(tmp_path, "train", crop=16, count=2, seed=4))
    assert not np.array_equal(crops, load_bsds300(tmp_path, "train", crop=16, count=2, seed=5))
    assert load_bsds300(tmp_path, "train", crop=16).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="crop=64"):
        load_bsds300(tmp_path, "train", crop=64)
    with pytest.raises(ValueError, match="split"):
        load_bsds300(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="test"):
        load_bsds300(tmp_path, "test")


def test_bsds300_real_images(shared_data: Path) -> None:
    root = shared_data / "bsds300"
    if not (root / "images" / "test").is_dir():
        pytest.skip(f"BSDS300 not found at {root}")
    crops = load_bsds300(root, "test", crop=48, count=3, seed=0)
    assert crops.shape == (3, 48, 48)
    assert 0.0 <= crops.min() and crops.max() <= 1.0 and crops.std() > 0.01
    # grayscale with ITU-R 601 weights, independent of the loader's code path
    from PIL import Image

    first = sorted((root / "images" / "test").glob("*.jpg"))[0]
    rgb = np.asarray(Image.open(first).convert("RGB"), dtype=np.float64) / 255.0
    gray = rgb @ np.array([0.299, 0.587, 0.114])
    rng = np.random.default_rng([0, 0])
    r = int(rng.integers(0, gray.shape[0] - 48 + 1))
    c = int(rng.integers(0, gray.shape[1] - 48 + 1))
    np.testing.assert_allclose(crops[0], gray[r : r + 48, c : c + 48], atol=1e-15)


def test_bsds300_several_crops_per_image(tmp_path: Path) -> None:
    """Image i gives crops i·k … i·k + k − 1, their corners the successive draws of
    default_rng([seed, i]) (checked against the decoded image), the first the crop of
    one crop per image; ``count`` counts images."""
    pil = pytest.importorskip("PIL.Image")
    make_jpegs(tmp_path, 3)
    one = load_bsds300(tmp_path, "train", crop=16, count=2, seed=4)
    three = load_bsds300(tmp_path, "train", crop=16, count=2, seed=4, per_image=3)
    assert three.shape == (6, 16, 16)
    np.testing.assert_array_equal(three[[0, 3]], one)
    for i, path in enumerate(sorted((tmp_path / "images" / "train").glob("*.jpg"))[:2]):
        with pil.open(path) as im:
            gray = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 @ np.array(
                [0.299, 0.587, 0.114])
        rng = np.random.default_rng([4, i])
        for j in range(3):
            r, c = int(rng.integers(0, 40 - 16 + 1)), int(rng.integers(0, 50 - 16 + 1))
            np.testing.assert_array_equal(three[3 * i + j], gray[r:r + 16, c:c + 16])
    assert len({three[k].tobytes() for k in range(6)}) == 6
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="per_image must be an integer >= 1"):
            load_bsds300(tmp_path, "train", crop=16, per_image=bad)
