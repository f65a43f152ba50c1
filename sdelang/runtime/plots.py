"""Figures of samples, images and training losses, written atomically.

Figures are built on matplotlib's `Figure` directly, not through pyplot: no display, no global
figure state, Agg rendering. Each file is written to a temporary file in the target folder and
moved into place (compiler.atomic_open), so a reader never sees half a PNG. matplotlib is imported inside
the functions, which keeps `import sdelang` fast.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_open

_GREY = "0.6"
_REFERENCE_POINTS = 5000  # enough to show a toy density's shape without hiding the samples


def scatter(path, samples, reference=None, title=None) -> Path:
    """2-D points [n, 2]; `reference` (e.g. the data) drawn beneath in grey.

    With a reference the frame is the reference's extent, and samples outside it are counted in
    the legend rather than allowed to shrink the picture.
    """
    points = _points(samples, "samples")
    frame = points if reference is None else _points(reference, "reference")
    low, high = frame.min(0), frame.max(0)
    margin = 0.05 * np.maximum(high - low, 1e-12)
    low, high = low - margin, high + margin
    # The figure takes the frame's aspect ratio (within 1:3 and 3:1), so equal axes leave no wide margins.
    ratio = float(np.clip((high[1] - low[1]) / (high[0] - low[0]), 1 / 3, 3))
    fig = _figure(5, 5 * ratio + 1.0)
    ax = fig.add_subplot()
    if reference is not None:
        ax.scatter(frame[:, 0], frame[:, 1], s=2, c=_GREY, alpha=0.5, linewidths=0, label="reference")
    outside = int((~((points >= low) & (points <= high)).all(1)).sum())
    label = f"samples ({len(points)}" + (f", {outside} outside the frame)" if outside else ")")
    ax.scatter(points[:, 0], points[:, 1], s=2, c="C0", alpha=0.6, linewidths=0, label=label)
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal")
    # Below the axes: inside, it would hide part of the density whatever corner it took.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncols=2, frameon=False, markerscale=4,
              fontsize="small")
    return _save(fig, path, title)


def image_grid(path, images, title=None) -> Path:
    """Images [n, C, H, W], C = 1 or 3, as 8-bit values in [0, 255] (uint8 or float; rounded and
    clipped), tiled in a near-square grid. Model-space samples go through Dataset.from_model first."""
    array = _numpy(images)
    if array.ndim != 4 or array.shape[1] not in (1, 3) or array.shape[0] == 0:
        raise ValueError(f"images must be [n, C, H, W] with n >= 1 and C in (1, 3), got shape {array.shape}")
    n, channels, height, width = array.shape
    pixels = np.clip(np.rint(array), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pad = 1  # a white line between images
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255, np.uint8)
    for i, image in enumerate(pixels):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        grid[top:top + height, left:left + width] = image
    fig = _figure(min(8, 0.25 + columns * 0.6), min(8, 0.25 + rows * 0.6) + (0.3 if title else 0))
    ax = fig.add_subplot()
    if channels == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    return _save(fig, path, title)


def loss_curve(path, steps, losses, title=None) -> Path:
    """Training loss against step, raw in light colour and a trailing running mean over
    w = max(1, n // 20) steps on top; log scale when every loss is positive."""
    steps, losses = _numpy(steps).ravel(), _numpy(losses).ravel()
    if len(steps) != len(losses) or len(steps) == 0:
        raise ValueError(f"steps and losses must have one equal, non-zero length, got {len(steps)} and {len(losses)}")
    window = max(1, len(losses) // 20)
    running = np.convolve(losses, np.full(window, 1 / window), mode="valid")
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="C0", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(steps[window - 1:], running, color="C0", linewidth=1.8, label=f"running mean ({window} steps)")
    if np.all(losses > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    return _save(fig, path, title)


def save_samples(path, samples, dataset, title=None, reference=None) -> Path:
    """Model-space samples of `dataset`: for points a scatter over `reference` (default: the first 5000
    rows of dataset.x; the first two coordinates beyond 2-D, a histogram in 1-D), for images a grid of
    the first 64 as 8-bit values (Dataset.from_model)."""
    shape = tuple(samples.shape[1:])
    if shape != tuple(dataset.shape):
        raise ValueError(f"samples have shape {shape} each, but {dataset.name!r} has {tuple(dataset.shape)}")
    title = dataset.name if title is None else title
    if dataset.kind == "image":
        return image_grid(path, dataset.from_model(samples[:64]), title)
    reference = dataset.x[:_REFERENCE_POINTS] if reference is None else reference
    if len(shape) != 1:
        raise ValueError(f"points must be vectors to plot; {dataset.name!r} has points of shape {shape}")
    if shape == (1,):
        return histogram(path, samples[:, 0], reference[:, 0], title)
    if shape != (2,):  # higher dimensions: the first two coordinates, and the title says so
        title = f"{title} (coordinates 1 and 2 of {shape[0]})"
    return scatter(path, samples[:, :2], reference[:, :2], title)


def histogram(path, samples, reference=None, title=None) -> Path:
    """1-D values: a density histogram of the samples over the reference's (shared bins)."""
    values = _numpy(samples).reshape(-1)
    fig = _figure(5, 3.5)
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(values if reference is None else _numpy(reference).reshape(-1), bins=60)
    if reference is not None:
        ax.hist(_numpy(reference).reshape(-1), bins=edges, density=True, color=_GREY, alpha=0.6, label="reference")
    ax.hist(values, bins=edges, density=True, histtype="step", color="C0", label=f"samples ({len(values)})")
    ax.legend(frameon=False, fontsize="small")
    return _save(fig, path, title)


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _points(values, what: str) -> np.ndarray:
    array = _numpy(values)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0:
        raise ValueError(f"{what} must be 2-D points [n, 2] with n >= 1, got shape {array.shape}")
    return array


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="tight")


def _save(fig, path, title) -> Path:
    """Write fig to path (format from the suffix, PNG when there is none), atomically."""
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"cannot write {str(path)!r}: unknown figure format {fmt!r}; use one of "
                         f"{', '.join(sorted(supported))}")
    if title:
        fig.suptitle(title)
    with atomic_open(path) as file:
        fig.savefig(file, format=fmt)
    return path
