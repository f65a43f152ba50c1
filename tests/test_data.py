"""Datasets (sdelang.runtime.data) and figures (sdelang.runtime.plots).

Statistical checks use fixed seeds and tolerances of 5 standard errors computed from the sample
size: the construction of each toy set makes its mean and E|x|^2 exact, so these can fail.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sdelang.errors import MissingDependency
from sdelang.runtime import plots
from sdelang.runtime.data import TOY_SETS, TOY_SIZES, Dataset, load_data, toy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def image_dataset(k: torch.Tensor) -> Dataset:
    """8-bit images holding k, in float32 unless k is a floating tensor already."""
    return Dataset("test", k if k.is_floating_point() else k.float(), "image", 256, tuple(k.shape[1:]))


def by_first_value(x: torch.Tensor) -> torch.Tensor:
    """Rows sorted by their first value (tests make it the row's index)."""
    return x[x.flatten(1)[:, 0].argsort()]


# --- toy sets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TOY_SETS)
def test_toy_shape_dtype_and_determinism(name):
    x = toy(name, 500, seeded(0))
    assert x.shape == (500, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.equal(x, toy(name, 500, seeded(0)))
    assert not torch.equal(x, toy(name, 500, seeded(1)))


@pytest.mark.parametrize("name", TOY_SETS)
def test_toy_is_standardised(name):
    # Each set is built to have mean 0 and E|x|^2 / 2 = 1 exactly; 5 standard errors of the sample mean.
    n = 20_000
    x = toy(name, n, seeded(2)).double()
    mean_error = x.std(0) / math.sqrt(n)
    assert (x.mean(0).abs() < 5 * mean_error).all(), (x.mean(0), mean_error)
    energy = (x**2).sum(1) / 2
    assert abs(energy.mean() - 1) < 5 * energy.std() / math.sqrt(n), energy.mean()


def test_toy_rejects_unknown_names_and_bad_sizes():
    with pytest.raises(ValueError, match="did you mean 'moons'"):
        toy("moon", 10)
    with pytest.raises(ValueError, match="positive integer"):
        toy("moons", 0)


@pytest.mark.parametrize("name", TOY_SETS)
def test_load_toy_splits(name):
    train, test = load_data(name), load_data(name, split="test")
    assert (train.kind, train.levels, train.shape) == ("points", None, (2,))
    assert len(train) == TOY_SIZES["train"] and len(test) == TOY_SIZES["test"]
    assert not torch.equal(train.x[:100], test.x[:100])
    assert torch.equal(train.x, load_data(name).x)  # no generator: the same data every time
    assert torch.equal(train.batch(64, seeded(0)), train.batch(64, seeded(0)))


def test_load_toy_generator_and_n():
    a = load_data("moons", n=300, generator=seeded(5))
    assert len(a) == 300
    assert torch.equal(a.x, load_data("moons", n=300, generator=seeded(5)).x)
    assert not torch.equal(a.x, load_data("moons", n=300, generator=seeded(6)).x)
    assert not torch.equal(a.x, load_data("moons", n=300, generator=seeded(5), split="test").x)


def test_points_batch_returns_rows():
    data = load_data("8gaussians", n=50)
    batch = data.batch(200, seeded(0))
    assert batch.shape == (200, 2)
    assert (batch[:, None, :] == data.x[None]).all(-1).any(1).all()
    assert torch.equal(data.from_model(batch), batch)
    with pytest.raises(ValueError, match="points"):
        data.to_model(batch, batch)


# --- digits and the 8-bit map -------------------------------------------------------------------

def test_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    train, test = load_data("digits"), load_data("digits", split="test")
    assert (train.kind, train.levels, train.shape) == ("image", 256, (1, 8, 8))
    assert train.x.dtype == torch.float32
    assert torch.equal(train.x, train.x.round()) and train.x.min() == 0 and train.x.max() == 255
    # The split is a partition of all 1797 images, one in five held out.
    everything = np.rint(datasets.load_digits().images * 255 / 16)
    assert (len(train), len(test)) == (1797 - 359, 359)
    rows = lambda x: sorted(map(tuple, x.reshape(len(x), -1).tolist()))
    assert rows(np.concatenate([train.x.numpy(), test.x.numpy()])) == rows(everything)
    batch = train.batch(256, seeded(0))
    assert batch.shape == (256, 1, 8, 8) and batch.min() >= -1 and batch.max() < 1
    recovered = torch.floor((batch + 1) / 2 * 256)
    assert (recovered[:, None] == train.x[None]).flatten(2).all(2).any(1).all()  # each is a training image
    assert len(load_data("digits", n=10)) == 10


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(MissingDependency, match=r"scikit-learn package, which is not installed; install it with: "
                                                r"pip install 'sdelang\[data\]'") as error:
        load_data("digits")
    assert isinstance(error.value, ImportError)  # callers that catch ImportError still do


def test_dequantisation_recovers_integers_and_is_uniform():
    # One image holding every value 0..255: each batch row must map back to it exactly.
    k = torch.arange(256.0).reshape(1, 1, 16, 16)
    data = image_dataset(k)
    x = data.batch(4000, seeded(3))  # 10^6 values: enough to see k + u rounded up to k + 1 (p ~ 2^-17)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() < 1
    bins = torch.floor((x + 1) / 2 * 256)
    assert torch.equal(bins, k.expand_as(x))
    assert torch.equal(data.from_model(x), bins)
    # u = (x + 1) / 2 * 256 - k ~ U[0, 1): mean 1/2 and each quarter with probability 1/4, to 5
    # standard errors (sqrt(1/12 / n) and sqrt(p (1 - p) / n)), for all values and for the edge bins.
    u = ((x + 1) / 2 * 256 - bins).double()
    for values in (u.flatten(), u[bins == 0], u[bins == 255]):
        n = values.numel()
        assert abs(values.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
        quarters = torch.bincount((values * 4).long(), minlength=4) / n
        assert (quarters - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / n), quarters


def test_dequantisation_in_float64():
    data = image_dataset(torch.arange(256.0).reshape(1, 1, 16, 16).double())
    x = data.batch(8, seeded(0))
    assert x.dtype == torch.float64
    assert torch.equal(data.from_model(x), data.x.expand_as(x))


@given(st.lists(st.integers(0, 255), min_size=1, max_size=20), st.floats(0, 1 - 2**-40))
def test_model_map_round_trip(values, u):
    data = image_dataset(torch.zeros(1, 1, 1, 1))
    k = torch.tensor(values, dtype=torch.float64)
    x = data.to_model(k, torch.full_like(k, u))
    assert (x >= -1).all() and (x < 1).all()
    assert torch.equal(data.from_model(x), k)


def test_from_model_clips():
    data = image_dataset(torch.zeros(1, 1, 1, 1))
    assert data.from_model(torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0])).tolist() == [0, 0, 128, 255, 255, 255]


# --- .npy files and image folders ---------------------------------------------------------------

def test_npy_points_round_trip(tmp_path):
    array = np.random.default_rng(0).normal(size=(50, 3))
    array[:, 0] = np.arange(50)  # identifies each row through the shuffled split
    np.save(tmp_path / "points.npy", array)
    train, test = (load_data(tmp_path / "points.npy", split=s) for s in ("train", "test"))
    assert (train.kind, train.levels, train.shape, len(train), len(test)) == ("points", None, (3,), 40, 10)
    both = by_first_value(torch.cat([train.x, test.x]))
    assert torch.equal(both, torch.from_numpy(array).float())
    assert torch.equal(load_data(str(tmp_path / "points.npy"), n=5).x, train.x[:5])


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"])
def test_npy_images_round_trip(tmp_path, layout):
    rng = np.random.default_rng(1)
    channels = 1 if layout == "NHW" else 3
    images = rng.integers(0, 256, size=(10, channels, 5, 7), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(10)
    stored = {"NHW": images[:, 0], "NCHW": images, "NHWC": images.transpose(0, 2, 3, 1)}[layout]
    np.save(tmp_path / "images.npy", stored)
    train, test = (load_data(tmp_path / "images.npy", split=s) for s in ("train", "test"))
    assert (train.kind, train.levels, train.shape) == ("image", 256, (channels, 5, 7))
    assert torch.equal(by_first_value(torch.cat([train.x, test.x])), torch.from_numpy(images).float())


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_image_folder_round_trip(tmp_path, mode):
    from PIL import Image

    rng = np.random.default_rng(2)
    channels = 1 if mode == "L" else 3
    images = rng.integers(0, 256, size=(6, 4, 5, channels), dtype=np.uint8)  # [n, H, W, C]
    images[:, 0, 0, 0] = np.arange(6)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image, skipped")
    train, test = load_data(tmp_path), load_data(tmp_path, split="test")
    assert (train.kind, train.shape, len(train), len(test)) == ("image", (channels, 4, 5), 5, 1)
    expected = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float()
    assert torch.equal(by_first_value(torch.cat([train.x, test.x])), expected)


def test_image_folder_mixed_modes_become_rgb(tmp_path):
    from PIL import Image

    Image.new("L", (3, 3), 7).save(tmp_path / "a.png")
    Image.new("RGBA", (3, 3), (1, 2, 3, 4)).save(tmp_path / "b.png")
    Image.new("RGB", (3, 3), (9, 9, 9)).save(tmp_path / "c.jpg", quality=100)
    Image.new("RGB", (3, 3), (5, 6, 7)).save(tmp_path / "d.png")
    Image.new("RGB", (3, 3), (5, 6, 7)).save(tmp_path / "e.png")
    data = load_data(tmp_path, split="test")  # one of the five
    assert data.shape == (3, 3, 3)


# --- errors -------------------------------------------------------------------------------------

def test_unknown_name_lists_and_suggests():
    with pytest.raises(ValueError, match="did you mean 'checkerboard'") as error:
        load_data("checker")
    assert "moons" in str(error.value) and "digits" in str(error.value) and ".npy" in str(error.value)
    with pytest.raises(ValueError, match="known: .*gaussian"):
        load_data("zzzz")


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_data(tmp_path / "missing.npy")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="expected a .npy file"):
        load_data(tmp_path / "data.csv")
    (tmp_path / "bad.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="cannot read"):
        load_data(tmp_path / "bad.npy")


def test_empty_folder_and_mismatched_sizes(tmp_path):
    from PIL import Image

    with pytest.raises(ValueError, match="holds no images"):
        load_data(tmp_path)
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    Image.new("L", (4, 5)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="differ in size: a.png is 4x4, b.png is 4x5"):
        load_data(tmp_path)


def test_unreadable_image(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_data(tmp_path)


@pytest.mark.parametrize("array, message", [
    (np.zeros((5, 2), dtype=np.int64), "unsupported dtype int64"),
    (np.zeros((5, 2), dtype=bool), "unsupported dtype bool"),
    (np.zeros(5), "reshape"),
    (np.zeros((5, 2), dtype=np.uint8), "uint8 image array"),
    (np.zeros((5, 7, 7, 7), dtype=np.uint8), "uint8 image array"),
    (np.array([[0.0, 1.0], [np.nan, 2.0], [np.inf, 1.0]]), "2 values are NaN or infinite .*sample 1"),
    (np.full((5, 2), 1e300), "10 values are NaN or infinite in float32"),
])
def test_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(ValueError, match=message):
        load_data(tmp_path / "x.npy")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_data("moons", split="validation")
    with pytest.raises(ValueError, match="positive integer"):
        load_data("moons", n=0)
    with pytest.raises(ValueError, match="batch size"):
        load_data("moons", n=10).batch(0)
    np.save(tmp_path / "one.npy", np.zeros((4, 2)))
    with pytest.raises(ValueError, match="too few for a test split"):
        load_data(tmp_path / "one.npy", split="test")
    with pytest.raises(ValueError, match="n=9, but the train split"):
        load_data(tmp_path / "one.npy", n=9)
    with pytest.raises(ValueError, match="levels"):
        Dataset("x", torch.zeros(3, 2), "image", None, (2,))
    with pytest.raises(ValueError, match="kind"):
        Dataset("x", torch.zeros(3, 2), "audio", None, (2,))


# --- plots --------------------------------------------------------------------------------------

def assert_only_png(folder, name):
    assert sorted(p.name for p in folder.iterdir()) == [name]  # no temporary file left behind
    assert (folder / name).read_bytes().startswith(PNG_MAGIC)


def test_scatter(tmp_path):
    points = toy("moons", 300, seeded(0))
    plots.scatter(tmp_path / "s.png", points * 3, reference=points, title="moons")
    assert_only_png(tmp_path, "s.png")


def test_image_grid_and_loss_curve(tmp_path):
    plots.image_grid(tmp_path / "g" / "grid.png", torch.randint(0, 256, (7, 3, 5, 5), generator=seeded(0)))
    assert_only_png(tmp_path / "g", "grid.png")
    losses = torch.linspace(2, 0.1, 200) + torch.rand(200, generator=seeded(1))
    plots.loss_curve(tmp_path / "l" / "loss.png", torch.arange(200), losses, title="loss")
    assert_only_png(tmp_path / "l", "loss.png")


def test_save_samples_picks_the_plot(tmp_path):
    points = load_data("swissroll", n=200)
    plots.save_samples(tmp_path / "p" / "points.png", points.batch(100, seeded(0)), points)
    assert_only_png(tmp_path / "p", "points.png")
    plots.save_samples(tmp_path / "r" / "points.png", points.batch(100, seeded(0)), points, reference=points.x[:50])
    assert_only_png(tmp_path / "r", "points.png")
    images = image_dataset(torch.randint(0, 256, (10, 1, 6, 6), generator=seeded(1)))
    plots.save_samples(tmp_path / "i" / "images.png", 1.5 * images.batch(9, seeded(2)), images)
    assert_only_png(tmp_path / "i", "images.png")
    with pytest.raises(ValueError, match="shape"):
        plots.save_samples(tmp_path / "x.png", torch.zeros(4, 3), points)


def test_plots_reject_bad_input_and_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        plots.scatter(tmp_path / "a.png", torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        plots.image_grid(tmp_path / "a.png", torch.zeros(5, 2, 4, 4))
    with pytest.raises(ValueError, match="equal, non-zero length"):
        plots.loss_curve(tmp_path / "a.png", [1, 2], [1.0])
    with pytest.raises(ValueError, match="unknown figure format 'xyz'"):
        plots.scatter(tmp_path / "a.xyz", torch.zeros(5, 2))
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.scatter(tmp_path / "a.png", torch.zeros(5, 2))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dim", [1, 3])
def test_save_samples_plots_points_of_any_dimension(tmp_path, dim):
    """1-D points as a histogram, more than two dimensions as the first two coordinates."""
    data = Dataset("points", torch.randn(500, dim, generator=seeded(0)), "points", None, (dim,), 1.0, 0.0)
    plots.save_samples(tmp_path / "s.png", torch.randn(200, dim, generator=seeded(1)), data)
    assert_only_png(tmp_path, "s.png")


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions build, instead of writing them."""
    built = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, title: built.append((fig, title)) or path)
    return built


def test_sample_panels_name_each_method_and_draw_the_reference_above(figures):
    points = load_data("moons", n=300)
    panels = [(f"method {i}", points.batch(100, seeded(i))) for i in range(3)]
    plots.save_panels("p.png", panels, points, title="moons: vp.sde", reference=points.x[:200])
    (fig, title), = figures
    assert title == "moons: vp.sde" and [ax.get_title() for ax in fig.axes] == ["method 0", "method 1", "method 2"]
    for ax in fig.axes:
        samples, reference = ax.collections
        assert len(samples.get_offsets()) == 100 and len(reference.get_offsets()) == 200
        assert reference.get_zorder() > samples.get_zorder()   # the data stay visible over dense samples


def test_generated_images_sit_beside_real_ones(figures):
    images = image_dataset(torch.randint(0, 256, (20, 1, 4, 4), generator=seeded(0)).float())
    plots.save_panels("g.png", [("pc", images.batch(9, seeded(1)))], images)
    (fig, _), = figures
    assert [ax.get_title() for ax in fig.axes] == ["data", "pc"]


def test_loss_plot_labels_the_steps_and_shows_the_held_out_nll(figures):
    steps = torch.arange(10, 2010, 10)
    plots.loss_curve("l.png", steps, torch.rand(200, generator=seeded(0)) + 1, evaluations=[(500, 3.1), (1000, 2.9)])
    (fig, _), = figures
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == ["loss (mean of each 10-step interval)", "running mean (100 steps)", "held-out NLL (bits/dim)"]
    assert list(fig.axes[1].lines[0].get_xdata()) == [500, 1000]
