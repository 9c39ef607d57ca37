import gzip
import struct

import numpy as np
import pytest
import torch

from calib.datasets import FASHION_MNIST_FILES, DataError, fashion_mnist, read_idx, synthetic
from calib.sampling import stratified_indices


def write_idx(path, arr: np.ndarray, gz=True):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def make_fmnist_folder(root, n_train=40, n_test=20):
    rng = np.random.default_rng(0)
    parts = {"train": n_train, "test": n_test}
    for key, name in FASHION_MNIST_FILES.items():
        part, kind = key.split("_")
        n = parts[part]
        arr = rng.integers(0, 256, (n, 28, 28)) if kind == "images" else np.arange(n) % 10
        write_idx(root / name, arr)
    return root


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    write_idx(tmp_path / "a.gz", arr)
    write_idx(tmp_path / "b", arr, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    assert np.array_equal(read_idx(tmp_path / "b"), arr)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    arr = np.zeros((5, 28, 28), np.uint8)
    write_idx(tmp_path / "x.gz", arr)
    raw = gzip.open(tmp_path / "x.gz").read()
    gzip.open(tmp_path / "short.gz", "wb").write(raw[:-10])
    with pytest.raises(DataError, match="short.gz: header says"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "text.gz").write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(DataError, match="text.gz: not an IDX file"):
        read_idx(tmp_path / "text.gz")


def test_fashion_mnist_from_any_folder(tmp_path):
    d = fashion_mnist(make_fmnist_folder(tmp_path))
    assert d.train.images.shape == (40, 1, 28, 28) and d.train.images.dtype == torch.uint8
    assert d.test.labels.tolist() == [i % 10 for i in range(20)]
    assert d.num_classes == 10 and d.input_shape == (1, 28, 28)


def test_fashion_mnist_missing_files_named(tmp_path):
    make_fmnist_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        fashion_mnist(tmp_path)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and "data.root" in msg and "apt-get install" in msg
    assert "train-images" not in msg


def test_synthetic_is_seeded_and_normalization_matches_numpy():
    a, b = synthetic(seed=3, train_size=64, test_size=32), synthetic(seed=3, train_size=64, test_size=32)
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, synthetic(seed=4, train_size=64, test_size=32).train.images)
    x = a.test.images
    assert np.allclose(a.normalize(x).numpy(), a.normalize_np(x.numpy()), atol=1e-6)
    assert abs(float(a.normalize(a.train.images).mean())) < 0.05


def test_stratified_sampling_is_proportional_and_reproducible():
    labels = torch.tensor([0] * 700 + [1] * 200 + [2] * 100)
    idx = stratified_indices(labels, 100, seed=1)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [70, 20, 10]
    assert torch.equal(idx, stratified_indices(labels, 100, seed=1))
    assert not torch.equal(idx, stratified_indices(labels, 100, seed=2))
