"""Shared fixtures: the example SDEs, their valid parameter ranges, Hypothesis settings.

The identity and reference tests run on the committed golden modules in generated/
(imported directly: instant, no SymPy); a separate test keeps those in sync with
examples/. Tests that compare against the derivation compile the example once per
session through ``compiled``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import sdelang
from sdelang.compiler import read_source

ROOT = Path(__file__).resolve().parents[1]

# Derandomized: every run draws the same examples, so a failure reproduces and CI never flakes.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=20, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", derandomize=False, deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The tests' tensors are small: a second OpenMP thread buys nothing and, on a loaded 2-core machine,
# its spin-waiting makes small operations 5-20 times slower.
torch.set_num_threads(1)

# Ranges over which each example's parameters are drawn: around the published defaults,
# wide enough to move every formula, and inside what each SDE supports.
PARAM_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "ve": {"sigma_min": (0.005, 0.1), "sigma_max": (10.0, 100.0)},
    "vp": {"beta_min": (0.05, 1.0), "beta_max": (5.0, 30.0)},
    "subvp": {"beta_min": (0.05, 1.0), "beta_max": (5.0, 30.0)},
    "vp_likelihood": {"beta_min": (0.05, 1.0), "beta_max": (5.0, 30.0)},
    "cosine_vp": {"s": (0.001, 0.02)},
    "edm_ve": {},
    "ou": {"theta": (0.2, 3.0), "mu": (-2.0, 2.0)},  # mu is declared real
    "numeric": {},
    # Given by their kernel or logSNR (the SDE derived): tests/test_kernel_form.py has their own references.
    "rectified_flow": {},
    "vdm": {"gamma_min": (-15.0, -8.0), "gamma_max": (2.0, 8.0)},  # gamma_min is negative: declared real
    "edm_vp": {"beta_d": (5.0, 30.0), "beta_min": (0.05, 1.0)},
}
EXAMPLE_NAMES = tuple(PARAM_RANGES)
# The examples without a scalar Gaussian kernel (kind "coupled" or "general"), which the affine
# identity tests above do not apply to: tests/test_coupled.py and tests/test_general.py cover them.
OTHER_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "cld": {"beta": (1.0, 8.0), "gamma": (0.01, 0.2), "M_inv": (1.0, 8.0)},
    "cubic_langevin": {"beta": (0.5, 8.0)},
    "underdamped": {"beta": (1.0, 8.0), "gamma": (0.01, 0.2), "M_inv": (1.0, 8.0)},
}


def pytest_configure(config):
    # A cache keyed by source text alone would hand back modules built by an older compiler:
    # give every session its own, unless the caller chose one.
    if "SDELANG_CACHE" not in os.environ:
        config._sdelang_cache = tempfile.mkdtemp(prefix="sdelang-test-cache-")
        os.environ["SDELANG_CACHE"] = config._sdelang_cache


def pytest_unconfigure(config):
    cache = getattr(config, "_sdelang_cache", None)
    if cache is not None:
        os.environ.pop("SDELANG_CACHE", None)
        shutil.rmtree(cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def import_path(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_code(code: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(code, f"<{name}>", "exec"), module.__dict__)
    return module


@dataclass
class Example:
    """One example SDE: its golden module and how to draw valid parameters and times for it."""

    name: str
    module: types.ModuleType
    ranges: dict[str, tuple[float, float]]

    def __repr__(self):  # keeps Hypothesis' falsifying examples short
        return f"Example({self.name!r})"

    def params(self) -> st.SearchStrategy[dict[str, float]]:
        return st.fixed_dictionaries({k: st.floats(lo, hi) for k, (lo, hi) in self.ranges.items()})

    def build(self, params: dict[str, float] | None = None, dtype=torch.float64, **kwargs):
        return self.module.SDE(**(params or {}), **kwargs).to(dtype)

    @staticmethod
    def times(sde, max_size: int = 6) -> st.SearchStrategy[torch.Tensor]:
        """Times in [eps, T], half log-uniform (crowding near eps, where precision is at stake), half uniform."""
        eps, T = float(sde.eps), float(sde.T)

        def at(draw):
            log_spaced, u = draw
            return eps * (T / eps) ** u if log_spaced else eps + u * (T - eps)

        one = st.tuples(st.booleans(), st.floats(0.0, 1.0)).map(at).map(lambda t: min(max(t, eps), T))
        return st.lists(one, min_size=1, max_size=max_size).map(
            lambda ts: torch.tensor(ts, dtype=torch.float64))


@pytest.fixture(scope="session")
def examples() -> dict[str, Example]:
    return {name: Example(name, import_path(ROOT / "generated" / f"{name}.py", f"sdelang_golden_{name}"),
                          PARAM_RANGES[name])
            for name in EXAMPLE_NAMES}


@pytest.fixture(scope="session")
def other_examples() -> dict[str, Example]:
    """The coupled and general examples, by name."""
    return {name: Example(name, import_path(ROOT / "generated" / f"{name}.py", f"sdelang_golden_{name}"), ranges)
            for name, ranges in OTHER_RANGES.items()}


@pytest.fixture(scope="session")
def all_examples(examples, other_examples) -> dict[str, Example]:
    return {**examples, **other_examples}


@dataclass(frozen=True)
class Fresh:
    compiled: sdelang.Compiled
    module: types.ModuleType


@pytest.fixture(scope="session")
def compiled():
    """name -> Fresh(compiled, module): examples/<name>.sde compiled now, once per session (1-10 s each)."""
    cache: dict[str, Fresh] = {}

    def get(name: str) -> Fresh:
        if name not in cache:
            c = sdelang.compile_source(read_source(ROOT / "examples" / f"{name}.sde"))
            cache[name] = Fresh(c, import_code(c.code, f"sdelang_fresh_{name}"))
        return cache[name]

    return get
