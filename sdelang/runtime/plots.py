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
    """2-D points [n, 2] over `reference` (e.g. held-out data); see panels for several sample sets."""
    return _save_panels(path, [(None, _points(samples, "samples"))], reference, title)


def _frame(points: list[np.ndarray], reference) -> tuple[np.ndarray, np.ndarray]:
    """The axes' extent: the reference's (samples outside it are counted, not allowed to shrink the
    picture), else all the samples', with a 5 % margin."""
    frame = np.concatenate(points) if reference is None else reference
    low, high = frame.min(0), frame.max(0)
    margin = 0.05 * np.maximum(high - low, 1e-12)
    return low - margin, high + margin


def _scatter_axes(ax, points: np.ndarray, reference, low, high, subtitle) -> None:
    # The samples first, the reference above them in small dark points: each stays visible where the
    # other is dense.
    outside = int((~((points >= low) & (points <= high)).all(1)).sum())
    label = f"samples ({len(points)}" + (f", {outside} outside the frame)" if outside else ")")
    ax.scatter(points[:, 0], points[:, 1], s=3, c="C0", alpha=0.6, linewidths=0, label=label, zorder=2)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=0.6, c="0.15", alpha=0.45, linewidths=0,
                   label=f"held-out data ({len(reference)})", zorder=3)
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal")
    if subtitle:
        ax.set_title(subtitle, fontsize="small")
    # Below the axes: inside, it would hide part of the density whatever corner it took.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncols=1, frameon=False, markerscale=4,
              fontsize="small")


def _save_panels(path, panels: list[tuple[str | None, np.ndarray]], reference, title) -> Path:
    reference = None if reference is None else _points(reference, "reference")
    low, high = _frame([p for _, p in panels], reference)
    # The figure takes the frame's aspect ratio (within 1:3 and 3:1), so equal axes leave no wide margins.
    ratio = float(np.clip((high[1] - low[1]) / (high[0] - low[0]), 1 / 3, 3))
    width = 4.5 if len(panels) > 1 else 5
    fig = _figure(width * len(panels), width * ratio + 1.3)
    for i, (subtitle, points) in enumerate(panels):
        _scatter_axes(fig.add_subplot(1, len(panels), i + 1), points, reference, low, high, subtitle)
    return _save(fig, path, title)


def image_grid(path, images, title=None) -> Path:
    """Images [n, C, H, W], C = 1 or 3, as 8-bit values in [0, 255] (uint8 or float; rounded and
    clipped), tiled in a near-square grid. Model-space samples go through Dataset.from_model first."""
    return image_grids(path, [(None, images)], title)


def image_grids(path, grids: list[tuple[str | None, object]], title=None) -> Path:
    """Several image grids side by side (e.g. held-out data beside each sampler's images), each with
    its subtitle; see image_grid."""
    tiles = [(subtitle, _tile(images)) for subtitle, images in grids]
    # About 0.6 inch an image, at most 4 inches a grid.
    side = min(4.0, 0.25 + 0.6 * max(math.ceil(len(images) ** 0.5) for _, images in grids))
    fig = _figure(0.2 + side * len(tiles), side + (0.3 if title else 0) + (0.25 if tiles[0][0] else 0))
    for i, (subtitle, grid) in enumerate(tiles):
        ax = fig.add_subplot(1, len(tiles), i + 1)
        if grid.shape[2] == 1:
            ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(grid, interpolation="nearest")
        ax.set_axis_off()
        if subtitle:
            ax.set_title(subtitle, fontsize="small")
    return _save(fig, path, title)


def _tile(images) -> np.ndarray:
    """[n, C, H, W] 8-bit values -> one [rows (H+1) + 1, columns (W+1) + 1, C] uint8 mosaic."""
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
    return grid


def loss_curve(path, steps, losses, title=None, evaluations=None) -> Path:
    """Training loss against step: each logged value (the mean of its logging interval) in light colour,
    and a trailing running mean over w = max(1, n // 20) of them on top, labelled with the steps it spans;
    log scale when every loss is positive and they span a decade. `evaluations`, (step, held-out bits/dim) pairs, go on a
    second axis."""
    steps, losses = _numpy(steps).ravel(), _numpy(losses).ravel()
    if len(steps) != len(losses) or len(steps) == 0:
        raise ValueError(f"steps and losses must have one equal, non-zero length, got {len(steps)} and {len(losses)}")
    window = max(1, len(losses) // 20)
    running = np.convolve(losses, np.full(window, 1 / window), mode="valid")
    interval = int(steps[1] - steps[0]) if len(steps) > 1 else int(steps[0])
    fig = _figure(6.5, 4)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="C0", alpha=0.35, linewidth=0.8, marker="." if len(steps) < 50 else None,
            label=f"loss (mean of each {interval}-step interval)")
    if window > 1:
        ax.plot(steps[window - 1:], running, color="C0", linewidth=1.8,
                label=f"running mean ({window * interval} steps)")
    if np.all(losses > 0) and losses.max() > 10 * losses.min():   # log scale only across a decade or more
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    handles, labels = ax.get_legend_handles_labels()
    if evaluations:
        at, bpd = (np.asarray(column, dtype=np.float64) for column in zip(*evaluations))
        second = ax.twinx()
        second.plot(at, bpd, color="C3", marker="o", markersize=3, linewidth=1.2, label="held-out NLL (bits/dim)")
        second.set_ylabel("held-out NLL (bits/dim)", color="C3")
        more_handles, more_labels = second.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="small")
    return _save(fig, path, title)


def save_samples(path, samples, dataset, title=None, reference=None) -> Path:
    """Model-space samples of `dataset`: for points a scatter over `reference` (default: the first 5000
    rows of dataset.x; the first two coordinates beyond 2-D, a histogram in 1-D), for images a grid of
    the first 64 as 8-bit values (Dataset.from_model), beside a grid of real images when `reference`
    (or dataset.x) has some."""
    return save_panels(path, [(None, samples)], dataset, title, reference)


def save_panels(path, panels: list[tuple[str | None, torch.Tensor]], dataset, title=None, reference=None) -> Path:
    """Several sets of model-space samples of `dataset` side by side in one figure, each panel with its
    subtitle (e.g. the sampler, its steps, NFE and two-sample p-value); see save_samples."""
    for _, samples in panels:
        shape = tuple(samples.shape[1:])
        if shape != tuple(dataset.shape):
            raise ValueError(f"samples have shape {shape} each, but {dataset.name!r} has {tuple(dataset.shape)}")
    shape = tuple(dataset.shape)
    title = dataset.name if title is None else title
    if reference is None and len(dataset.x):
        reference = dataset.x[:_REFERENCE_POINTS]
    if dataset.kind == "image":
        grids = [(subtitle or "samples", dataset.from_model(samples[:64])) for subtitle, samples in panels]
        if reference is not None and len(reference):
            grids.insert(0, ("data", reference[:64]))   # dataset.x holds the 8-bit values
        return image_grids(path, grids, title)
    if len(shape) != 1:
        raise ValueError(f"points must be vectors to plot; {dataset.name!r} has points of shape {shape}")
    if shape == (1,):
        samples = panels[0][1]
        return histogram(path, samples[:, 0], None if reference is None else reference[:, 0],
                         panels[0][0] or title)
    if shape != (2,):  # higher dimensions: the first two coordinates, and the title says so
        title = f"{title} (coordinates 1 and 2 of {shape[0]})"
    return _save_panels(path, [(subtitle, _points(samples[:, :2], "samples")) for subtitle, samples in panels],
                        None if reference is None else reference[:, :2], title)


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
