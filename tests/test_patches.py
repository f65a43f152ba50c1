"""Image data at CIFAR size: the photograph patches' split, and CIFAR-10 read without running its pickles."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from sdelang.runtime import patches
from sdelang.runtime.data import load_data

datasets = pytest.importorskip("sklearn.datasets")


def _coverage(origins, height, width):
    """How many patches of a split cover each pixel of a photograph."""
    count = np.zeros((height, width), dtype=int)
    for r, c in origins:
        count[r:r + 32, c:c + 32] += 1
    return count


def test_patches_are_cut_from_the_photographs_and_split_by_region():
    photos = [np.asarray(p) for p in datasets.load_sample_images().images]
    train, test = load_data("patches"), load_data("patches", split="test")
    assert (train.kind, train.levels, train.shape) == ("image", 256, (3, 32, 32))
    assert (len(train), len(test)) == (2 * 2650, 2 * 52)
    assert torch.equal(train.x, train.x.round()) and train.x.min() >= 0 and train.x.max() <= 255
    for p, photo in enumerate(photos):
        height, width = photo.shape[:2]
        train_origins = patches.patch_origins(height, "train")
        test_origins = patches.patch_origins(height, "test")
        used_train = _coverage(train_origins, height, width)
        used_test = _coverage(test_origins, height, width)
        # No pixel is in both splits, test patches do not overlap each other, and a column of at least
        # one patch width separates the two regions (so not even neighbouring pixels are shared).
        assert not (used_train.astype(bool) & used_test.astype(bool)).any()
        assert used_test.max() == 1
        last_train = np.nonzero(used_train.any(0))[0].max()
        first_test = np.nonzero(used_test.any(0))[0].min()
        assert first_test - last_train - 1 >= 32
        # The tensors hold exactly those pixels, channels first, in the order of the origins.
        for split, origins, data in (("train", train_origins, train), ("test", test_origins, test)):
            offset = p * len(origins)
            for i in (0, len(origins) // 2, len(origins) - 1):
                r, c = origins[i]
                expected = torch.from_numpy(photo[r:r + 32, c:c + 32].transpose(2, 0, 1).astype(np.float32))
                assert torch.equal(data.x[offset + i], expected), (split, i)
    flat_train = {row.tobytes() for row in train.x.to(torch.uint8).flatten(1).numpy()}
    assert not any(row.tobytes() in flat_train for row in test.x.to(torch.uint8).flatten(1).numpy())
    batch = train.batch(64, torch.Generator().manual_seed(0))
    assert batch.shape == (64, 3, 32, 32) and batch.min() >= -1 and batch.max() < 1


def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"testing batch", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _write_cifar(folder, sizes=(3, 2, 2, 2, 2), test=4):
    batches = {}
    for i, n in enumerate(sizes, 1):
        batches[f"data_batch_{i}"] = _cifar_batch(n, i)
    batches["test_batch"] = _cifar_batch(test, 99)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))   # the original files are protocol 2
    return batches


def test_cifar_folder_is_read_with_its_own_split(tmp_path):
    batches = _write_cifar(tmp_path)
    train, test = load_data(str(tmp_path)), load_data(str(tmp_path), split="test")
    assert (train.shape, train.levels, len(train), len(test)) == ((3, 32, 32), 256, 11, 4)
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.x, torch.from_numpy(expected).float())
    assert torch.equal(test.x, torch.from_numpy(batches["test_batch"][b"data"].reshape(-1, 3, 32, 32)).float())


class _Planted:
    """Unpickling this runs os.system: the marker file appears only if the reader executes the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["system", "object array", "nested"])
def test_cifar_reader_refuses_planted_pickles(tmp_path, payload):
    _write_cifar(tmp_path)
    marker = tmp_path / "planted-code-ran"
    evil = {"system": _Planted(marker),
            "object array": {b"data": np.array([_Planted(marker)], dtype=object)},
            "nested": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Planted(marker)]}}[payload]
    (tmp_path / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(ValueError, match="test_batch.*refused: refusing"):
        load_data(str(tmp_path), split="test")
    assert not marker.exists()


def test_cifar_reader_errors(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="lacks data_batch_3"):
        load_data(str(tmp_path))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}, protocol=2))
    with pytest.raises(ValueError, match=r"uint8 array \[n, 3072\]"):
        load_data(str(tmp_path), split="test")
    (tmp_path / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        load_data(str(tmp_path), split="test")
