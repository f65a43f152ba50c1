"""Datasets the runtime trains on, as float32 tensors in model space.

Two kinds:

- "points": continuous data, used as it is. The 2-D toy sets are generated (see `toy`); a float
  .npy array [n, ...] is read.
- "image": 8-bit data. `Dataset.x` holds the integers k in 0..255 (as floats); `Dataset.batch`
  dequantises them uniformly, y = (k + u) / 256 with u ~ U[0, 1), and maps y in [0, 1] to model
  space x = scale * y + shift = 2 y - 1 in [-1, 1]. The density of y is the one bits per dimension
  is quoted in: log p_y = log p_x + D log(scale) (MATH.md section 5).

`load_data(spec)` reads a toy name, "digits" (scikit-learn's bundled 8x8 digits), "patches" (32x32x3
patches of scikit-learn's sample photographs), a .npy file, a folder of PNG/JPEG images or a CIFAR-10
python folder. Stored data is split 80/20 into train and test by a fixed seeded permutation, except
patches (split by region of the photograph) and CIFAR-10 (its own files; both in patches.py); toy sets
draw train and test from different seeded streams.
"""
from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import MissingDependency
from . import patches

TOY_SETS = ("moons", "swissroll", "checkerboard", "8gaussians", "gaussian")
STORED_SETS = ("digits", "patches")
SPLITS = ("train", "test")
TOY_SIZES = {"train": 50_000, "test": 5_000}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SPLIT_SEED = 0  # the train/test permutation of stored data; changing it reshuffles every split
_TEST_ONE_IN = 5  # one sample in five is held out


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensor fields with == has no single truth value
class Dataset:
    """A training set in model space.

    name:   what it was loaded from.
    x:      [n, *shape] float32. Points: the data itself. Images: the 8-bit integers k, as floats.
    kind:   "points" (continuous) or "image" (8-bit; `batch` dequantises).
    levels: 256 for 8-bit images, None for points.
    shape:  the shape of one sample, e.g. (2,) or (1, 8, 8).
    scale, shift: the image map x = scale * y + shift from y = (k + u) / levels in [0, 1] to model
            space; the defaults give x in [-1, 1]. A likelihood in model space converts to y by
            log p_y = log p_x + D log(scale). Points are in model space already: load_data sets 1, 0.
    """

    name: str
    x: Tensor
    kind: str
    levels: int | None
    shape: tuple
    scale: float = 2.0
    shift: float = -1.0

    def __post_init__(self):
        if self.kind not in ("points", "image"):
            raise ValueError(f"kind must be 'points' or 'image', got {self.kind!r}")
        if self.kind == "image" and not (isinstance(self.levels, int) and self.levels >= 2):
            raise ValueError(f"an image dataset needs levels >= 2 (256 for 8-bit data), got {self.levels!r}")
        if self.kind == "points" and self.levels is not None:
            raise ValueError(f"a points dataset is continuous: levels must be None, got {self.levels!r}")
        if not self.x.is_floating_point() or tuple(self.x.shape[1:]) != tuple(self.shape):
            raise ValueError(f"x must be a floating tensor [n, *{tuple(self.shape)}], "
                             f"got {self.x.dtype} {tuple(self.x.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, size: int, generator: torch.Generator | None = None) -> Tensor:
        """`size` random rows, drawn with replacement, in model space.

        Images are dequantised: x = scale * (k + u) / levels + shift, u ~ U[0, 1) per value.
        """
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"batch size must be a positive integer, got {size!r}")
        index = torch.randint(len(self), (size,), generator=generator, device=self.x.device)
        rows = self.x[index]
        return rows if self.kind == "points" else self.dequantise(rows, generator)

    def dequantise(self, k: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images: the integers k with uniform noise, x = scale * (k + u) / levels + shift, u ~ U[0, 1)."""
        # u on the grid j / 2^bits, with bits the float's significand width less log2(levels): then k + u
        # is exact and (with the default powers of two scale / levels and shift -1) so is x, which lies
        # strictly inside k's bin, and floor recovers k. A float32 torch.rand would round k + u up to
        # k + 1 about once in 2^17 values. The grid is as fine as float32 resolves x near +-1.
        precision = 1 - round(math.log2(torch.finfo(k.dtype).eps))  # significand bits: 24 for float32
        bits = precision - math.ceil(math.log2(self.levels))
        j = torch.randint(0, 2**bits, k.shape, generator=generator, device=k.device)
        return self.to_model(k, j.to(k.dtype) * 2.0**-bits)

    def to_model(self, k: Tensor, u: Tensor) -> Tensor:
        """The image map: x = scale * (k + u) / levels + shift, for integers k and u in [0, 1)."""
        if self.kind != "image":
            raise ValueError(f"to_model is the map of 8-bit images; {self.name!r} holds points, "
                             "which are already in model space")
        return (k + u) * (self.scale / self.levels) + self.shift

    def from_model(self, x: Tensor) -> Tensor:
        """Back to data values: for images the bin k = floor((x - shift) / scale * levels), clipped to
        0..levels-1 (samples may leave [-1, 1]), as floats; points are returned as they are."""
        if self.kind == "points":
            return x
        return torch.floor((x - self.shift) * (self.levels / self.scale)).clamp(0, self.levels - 1)


# --- toy sets -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Toy:
    """A toy set: noise-free points with their exact moments, and the noise added after standardising."""

    draw: Callable[[int, torch.Generator | None], Tensor]  # [n, 2] float32, noise-free
    mean: tuple[float, float]  # exact mean of draw
    var: float  # exact per-coordinate variance of draw, averaged over the two coordinates
    noise: float  # std of the Gaussian noise in the final, standardised units


def _uniform(n, generator):
    return torch.rand(n, generator=generator)


def _moons(n, generator):
    # theta ~ U[0, pi]; outer arc (cos, sin), inner arc (1 - cos, 1/2 - sin), each with probability 1/2.
    theta = math.pi * _uniform(n, generator)
    inner = torch.randint(0, 2, (n, 1), generator=generator).bool()
    outer_arc = torch.stack([theta.cos(), theta.sin()], 1)
    inner_arc = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], 1)
    return torch.where(inner, inner_arc, outer_arc)


def _swissroll(n, generator):
    # (t cos t, t sin t), t ~ U[3 pi / 2, 9 pi / 2]: one and a half turns.
    t = math.pi * (1.5 + 3 * _uniform(n, generator))
    return torch.stack([t * t.cos(), t * t.sin()], 1)


def _checkerboard(n, generator):
    # The dark squares of a 4 x 4 board on [-2, 2]^2: column c, then a row r of c's parity.
    column = torch.randint(-2, 2, (n,), generator=generator)
    row = 2 * torch.randint(0, 2, (n,), generator=generator) - 2 + column % 2
    return torch.stack([column + _uniform(n, generator), row + _uniform(n, generator)], 1)


def _eight_gaussians(n, generator):
    # Centres at the eighth roots of unity; the noise makes them Gaussians.
    angle = (math.pi / 4) * torch.randint(0, 8, (n,), generator=generator)
    return torch.stack([angle.cos(), angle.sin()], 1)


def _gaussian(n, generator):
    return torch.randn(n, 2, generator=generator)


# The moments are integrals over the uniform parameters above (theta, t, the square), in closed form:
# moons   E = (1/2, 1/4), Var = (3/4, 9/16 - 1/pi)
# swiss   E = (2, 2/(3 pi)), E|x|^2 = E t^2 = 39 pi^2 / 4
# board   each coordinate U[-2, 2]: E = 0, Var = 4/3
# 8gauss  E = 0, E cos^2 = E sin^2 = 1/2
_TOYS = {
    "moons": _Toy(_moons, (0.5, 0.25), 21 / 32 - 1 / (2 * math.pi), 0.1),
    "swissroll": _Toy(_swissroll, (2.0, 2 / (3 * math.pi)), 39 * math.pi**2 / 8 - 2 - 2 / (9 * math.pi**2), 0.1),
    "checkerboard": _Toy(_checkerboard, (0.0, 0.0), 4 / 3, 0.0),
    "8gaussians": _Toy(_eight_gaussians, (0.0, 0.0), 0.5, 0.1),
    "gaussian": _Toy(_gaussian, (0.0, 0.0), 1.0, 0.0),
}


def toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n points [n, 2] float32 of a 2-D toy set, standardised to mean 0 and E|x|^2 / 2 = 1:

        x = sqrt(1 - noise^2) (p - E p) / sqrt(Var p) + noise z,   z ~ N(0, I),

    p the noise-free points, Var p their per-coordinate variance averaged over both coordinates.
    """
    if name not in _TOYS:
        raise ValueError(_unknown(name, TOY_SETS, "toy set"))
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    spec = _TOYS[name]
    points = (spec.draw(n, generator) - torch.tensor(spec.mean)) / math.sqrt(spec.var)
    if spec.noise == 0:
        return points
    return math.sqrt(1 - spec.noise**2) * points + spec.noise * torch.randn(n, 2, generator=generator)


def _toy_seed(name: str, split: str, base: int) -> int:
    """A seed for one (name, split) stream, stable across runs (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{name}:{split}:{base}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- loading ------------------------------------------------------------------------------------

def load_data(spec: str | Path, *, n: int | None = None, generator: torch.Generator | None = None,
              split: str = "train") -> Dataset:
    """The dataset `spec` names: a toy set (TOY_SETS), "digits", a .npy file or a folder of images.

    n: how many samples (toys: default TOY_SIZES[split]; stored data: the first n of the split,
       default all of it).
    generator: toys only; train and test are drawn from streams seeded by the name, the split and a
       number taken from `generator` (a fixed number when None, so the data is the same every run).
    split: "train" or "test". Stored data is split 80/20 by a fixed seeded permutation.
    A float .npy array [n, ...] is points; a uint8 array [n, H, W], [n, C, H, W] or [n, H, W, C]
    (channels last when dim 1 is not 1, 3 or 4) is 8-bit images. A folder of PNG/JPEG images, all of one
    size, is read with Pillow as [n, C, H, W], C = 1 if all are greyscale, else 3.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n is not None and not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    name = str(spec)
    if name in TOY_SETS:
        base = 0 if generator is None else int(torch.randint(0, 2**62, (), generator=generator))
        x = toy(name, n or TOY_SIZES[split], torch.Generator().manual_seed(_toy_seed(name, split, base)))
        return Dataset(name, x, "points", None, (2,), scale=1.0, shift=0.0)
    if name == "patches" or patches.is_cifar_folder(Path(spec)):
        # split by the data's own geometry (patches.py) or by CIFAR-10's files, not by a permutation
        x = patches.patches(split) if name == "patches" else patches.read_cifar10(Path(spec), split)
        return Dataset(name, _take(x, n, name, split), "image", 256, tuple(x.shape[1:]))
    if name == "digits":
        x, kind = _digits(), "image"
    else:
        x, kind = _read_path(Path(spec))
    x = _take(_split(x, split, name), n, name, split)
    if kind == "points":
        return Dataset(name, x, "points", None, tuple(x.shape[1:]), scale=1.0, shift=0.0)
    return Dataset(name, x, "image", 256, tuple(x.shape[1:]))


def _unknown(name: str, known: tuple[str, ...], what: str, also: str = "") -> str:
    """'unknown <what> <name>; known: ...; did you mean <closest>?'"""
    message = f"unknown {what} {name!r}; known: {', '.join(known)}{also}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)  # "mnist" (0.6 like "moons") is no near miss
    return message + (f"; did you mean {close[0]!r}?" if close else "")


def _digits() -> Tensor:
    """scikit-learn's 8x8 digits, [1797, 1, 8, 8]: values v in 0..16 as 8-bit k = round(v * 255 / 16)
    (half to even: v = 8 gives 127.5 -> 128)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise MissingDependency("the 'digits' data set", "scikit-learn", "data") from error
    k = np.rint(load_digits().images * (255 / 16))
    return torch.from_numpy(k).to(torch.float32).unsqueeze(1)


def _read_path(path: Path) -> tuple[Tensor, str]:
    if not path.exists():
        known = TOY_SETS + STORED_SETS
        if path.suffix or len(path.parts) > 1:
            raise ValueError(f"no such file or folder: {str(path)!r} (a dataset is one of {', '.join(known)}, "
                             "a .npy file or a folder of PNG/JPEG images)")
        raise ValueError(_unknown(str(path), known, "dataset", also=", a .npy file or a folder of PNG/JPEG images"))
    if path.is_dir():
        return _read_folder(path), "image"
    if path.suffix.lower() != ".npy":
        raise ValueError(f"cannot read {str(path)!r}: expected a .npy file or a folder of PNG/JPEG images")
    return _read_npy(path)


def _read_npy(path: Path) -> tuple[Tensor, str]:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:  # object arrays, or not a .npy file
        raise ValueError(f"cannot read {str(path)!r} as a numeric .npy array: {error}") from error
    if array.ndim < 2 or array.shape[0] == 0:
        raise ValueError(f"{str(path)!r}: expected an array [n, ...] with n >= 1 samples, got shape "
                         f"{array.shape} (a 1-D array of scalars is array.reshape(-1, 1))")
    if array.dtype == np.uint8:
        return torch.from_numpy(_channels_first(array, path)).to(torch.float32), "image"
    if array.dtype.kind != "f":
        raise ValueError(f"{str(path)!r}: unsupported dtype {array.dtype}; float arrays are points and uint8 "
                         "arrays are 8-bit images (convert with .astype(np.float32) or .astype(np.uint8))")
    with np.errstate(over="ignore"):  # values beyond float32's range become inf, reported just below
        x = torch.from_numpy(array.astype(np.float32))
    bad = ~torch.isfinite(x)
    if bad.any():
        row = int(bad.flatten(1).any(1).nonzero()[0])
        raise ValueError(f"{str(path)!r}: {int(bad.sum())} values are NaN or infinite in float32 "
                         f"(first in sample {row}); remove or repair those samples")
    return x, "points"


def _channels_first(array: np.ndarray, path: Path) -> np.ndarray:
    """[n, H, W] -> [n, 1, H, W]; [n, C, H, W] as it is; [n, H, W, C] -> [n, C, H, W]."""
    if array.ndim == 3:
        return array[:, None]
    channels = (1, 3, 4)
    if array.ndim == 4 and array.shape[1] in channels:
        return array
    if array.ndim == 4 and array.shape[3] in channels:
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2))
    raise ValueError(f"{str(path)!r}: a uint8 image array must be [n, H, W], [n, C, H, W] or [n, H, W, C] "
                     f"with C in {channels}, got shape {array.shape}")


def _read_folder(folder: Path) -> Tensor:
    """The PNG/JPEG files of `folder`, sorted by name, as [n, C, H, W] 8-bit values in float32."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the training "
                         "images there or name a .npy file")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()  # decode now: a truncated or damaged file fails here, where its name is known
                images.append(_eight_bit(image, file))
        except UnidentifiedImageError as error:
            raise ValueError(f"{str(file)!r} is not a readable image: {error}") from error
        except OSError as error:  # Pillow's "image file is truncated" and damaged data
            raise ValueError(f"{str(file)!r} is damaged ({error}); replace or remove it") from error
        if images[-1].size != images[0].size:
            raise ValueError(f"images differ in size: {files[0].name} is {images[0].size[0]}x{images[0].size[1]}, "
                             f"{file.name} is {images[-1].size[0]}x{images[-1].size[1]} (width x height); "
                             "resize them to one size")
    mode = "L" if all(image.mode == "L" for image in images) else "RGB"
    arrays = [np.asarray(image.convert(mode)) for image in images]
    stacked = np.stack(arrays)  # [n, H, W] or [n, H, W, 3]
    stacked = stacked[:, None] if mode == "L" else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked)).to(torch.float32)


def _eight_bit(image, file: Path):
    """The image as greyscale ("L") or RGB, 8 bits a channel; alpha is dropped."""
    if image.mode in ("1", "L", "LA"):
        return image.convert("L")
    if image.mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"):
        return image.convert("RGB")
    raise ValueError(f"{str(file)!r} has pixel mode {image.mode!r}, not 8-bit greyscale or colour; "
                     "save it as 8-bit PNG")


def _split(x: Tensor, split: str, name: str) -> Tensor:
    """The train (4/5) or test (1/5) part of stored data, by a permutation fixed by _SPLIT_SEED."""
    order = torch.from_numpy(np.random.default_rng(_SPLIT_SEED).permutation(len(x)))
    n_test = len(x) // _TEST_ONE_IN
    part = order[:n_test] if split == "test" else order[n_test:]
    if len(part) == 0:
        raise ValueError(f"{name!r} has {len(x)} samples, too few for a test split "
                         f"(one in {_TEST_ONE_IN} is held out)")
    return x[part]


def _take(x: Tensor, n: int | None, name: str, split: str) -> Tensor:
    if n is None:
        return x
    if n > len(x):
        raise ValueError(f"n={n}, but the {split} split of {name!r} has {len(x)} samples")
    return x[:n]
