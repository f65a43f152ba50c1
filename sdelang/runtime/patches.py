"""Natural images at CIFAR size without a download: 32x32x3 patches of photographs, and CIFAR-10 read safely.

`patches()`: 32x32 RGB patches cut from the two photographs that ship inside scikit-learn
(`sklearn.datasets.load_sample_images`: china.jpg and flower.jpg, 427x640 each). Each photograph is
split by columns into a training region (the left 480 columns) and a test region (the right 128), with a
gap of one patch width between them, so that no test pixel is ever in a training patch and no
training patch touches the test region's border pixels:

    columns   0 ............ 447 | 448 ... 479 (gap, unused) | 480 ....... 607 | 608 ... 639 unused
              training patches, stride 8                       test patches, stride 32 (non-overlapping)

Training patches overlap (stride 8 in both directions: 50 x 53 = 2650 per photograph, 5300 in all);
test patches do not overlap each other either (stride 32: 13 x 4 = 52 per photograph, 104), so the
held-out datapoints are as independent as one photograph's pixels allow. The split is fixed by the
geometry above, not by a seed.

`read_cifar10(folder)`: the standard "CIFAR-10 python version" folder (data_batch_1..5, test_batch).
Those files are pickles, and unpickling runs whatever code the file names, so a planted file would run
its code in the reader's process. They are read by `_SafeUnpickler`, which builds only dicts, lists,
bytes, str, ints and uint8 numpy arrays (and bytes from latin-1 text, as Python 3 writes them): any
other global a pickle asks for (os.system, builtins.eval, numpy.load, object arrays, ...) is refused
with a ValueError before anything is called.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import MissingDependency

PATCH = 32
TRAIN_STRIDE = 8
TRAIN_COLUMNS = 448      # training patches lie in columns [0, 448)
TEST_START = 480         # test patches lie in columns [480, 608): one patch width of gap after training
TEST_COLUMNS = 128
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)


def _photographs() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise MissingDependency("the 'patches' data set (scikit-learn's sample photographs)", "scikit-learn",
                                "data") from error
    return [np.asarray(image, dtype=np.uint8) for image in load_sample_images().images]


def patch_origins(height: int, split: str) -> list[tuple[int, int]]:
    """(row, column) of the top-left corner of every patch of `split` in a photograph of `height` rows."""
    if split == "train":
        rows = range(0, height - PATCH + 1, TRAIN_STRIDE)
        columns = range(0, TRAIN_COLUMNS - PATCH + 1, TRAIN_STRIDE)
    elif split == "test":
        rows = range(0, height - PATCH + 1, PATCH)
        columns = range(TEST_START, TEST_START + TEST_COLUMNS - PATCH + 1, PATCH)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [(r, c) for r in rows for c in columns]


def patches(split: str) -> Tensor:
    """The `split` patches, [n, 3, 32, 32] 8-bit values as float32, photograph by photograph in row-major
    order of their corners (module docstring for the geometry)."""
    out = []
    for photo in _photographs():
        if photo.shape[1] < TEST_START + TEST_COLUMNS:
            raise ValueError(f"a sample photograph is {photo.shape[1]} columns wide; the patch split needs "
                             f"{TEST_START + TEST_COLUMNS} (scikit-learn's sample images are 640)")
        for r, c in patch_origins(photo.shape[0], split):
            out.append(photo[r:r + PATCH, c:c + PATCH])
    array = np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2))
    return torch.from_numpy(array).to(torch.float32)


# --- CIFAR-10, python version -------------------------------------------------------------------

def _reconstruct(subtype, shape, typecode):
    """numpy's array constructor as the pickle calls it, for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to build an array of type {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, np.dtype(np.uint8))


def _dtype(name, align=False, copy=False):
    """numpy.dtype as the pickle calls it, for uint8 only (object arrays could hold anything)."""
    if name not in ("u1", "|u1"):
        raise pickle.UnpicklingError(f"refusing array dtype {name!r}; CIFAR-10 holds uint8 pixels")
    return np.dtype(np.uint8, False, True)  # a copy: the pickle's BUILD then sets the copy's state


def _latin1(text, encoding="latin1"):
    """_codecs.encode as protocol-2 pickles written by Python 3 call it to rebuild bytes: str -> bytes only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refusing _codecs.encode other than str -> latin1 bytes")
    return text.encode("latin1")


class _SafeUnpickler(pickle.Unpickler):
    """Builds only the types a CIFAR-10 batch holds; any other global is refused (module docstring)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray,
               ("numpy", "dtype"): _dtype,
               ("_codecs", "encode"): _latin1}

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only dicts, "
                                         "lists, bytes, ints and uint8 arrays") from None


def read_cifar_batch(path: Path) -> np.ndarray:
    """The images of one CIFAR-10 python batch file, [n, 3, 32, 32] uint8, read without running its code."""
    data = Path(path).read_bytes()
    try:
        batch = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch that can be read "
                         f"safely (refused: {error})") from None
    pixels = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2
            and pixels.shape[1] == 3 * PATCH * PATCH):
        raise ValueError(f"{str(path)!r}: expected a dict whose 'data' is a uint8 array [n, 3072], "
                         f"got {type(batch).__name__}")
    return pixels.reshape(-1, 3, PATCH, PATCH)


def is_cifar_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CIFAR_TEST[0]).is_file()


def read_cifar10(folder: Path, split: str) -> Tensor:
    """CIFAR-10's own split from its python-version folder: data_batch_1..5 (train, 50000) or test_batch
    (test, 10000), [n, 3, 32, 32] 8-bit values as float32."""
    names = {"train": CIFAR_TRAIN, "test": CIFAR_TEST}.get(split)
    if names is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    missing = [name for name in names if not (Path(folder) / name).is_file()]
    if missing:
        raise ValueError(f"{str(folder)!r} looks like a CIFAR-10 python folder but lacks {', '.join(missing)}; "
                         "extract cifar-10-python.tar.gz there in full")
    arrays = [read_cifar_batch(Path(folder) / name) for name in names]
    return torch.from_numpy(np.concatenate(arrays)).to(torch.float32)
