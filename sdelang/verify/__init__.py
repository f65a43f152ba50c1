"""Numerical verification of a compiled SDE: what ``sdelang check FILE`` runs (docs/check.md).

Every check is one function ``check(sde, settings) -> list[CheckResult]`` that works on a float64 copy
of the module and compares two independent computations (MATH.md sections 1, 3, 6 and 7), one module
per kind of check:

    simulation  Euler-Maruyama paths of sde() against marginal_prob()'s mean and (co)variance
    moments     the moment ODEs by finite differences
    methods     the kernel's methods against each other and against sde(); discretize, drift_divergence
                and reverse against them
    prior       prior_logp() against prior_sampling(); KL(p_T || prior) and the information left at T
    sampler     t_density() against t_cdf(), t_icdf(), sample_t() and its stated form
    precision   float32 against float64 near eps and across [eps, T]
    score       hybrid score matching: noise_to_score() against the kernel's score and weight(t)

``CHECKS`` lists the checks of each kind of module ("affine", "general", "coupled"); a check that needs
what a kind lacks reports n/a with the reason. Each row's measured value and tolerance are in the same
units, said by its note; a row with several comparisons shows the one nearest its tolerance.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Callable

import torch

from ..errors import SdeError
from ..loader import load, load_module
from .common import (DEFAULT_PATHS, DEFAULT_STEPS, FAIL, KS_LEVEL, NA, OK, WARN, CheckResult, Settings, kind_of,
                     not_applicable)
from .methods import coupled_kernel_methods, general_methods, kernel_methods, step_methods
from .moments import coupled_moment_odes, moment_odes
from .precision import float32_precision
from .prior import coupled_prior_gap, gaussian_kl, prior_gap, prior_gap_simulated, prior_gaussian
from .report import format_table, passed, to_json
from .sampler import ks_critical, ks_uniform, time_sampler
from .score import hybrid_score
from .simulation import coupled_forward_simulation, forward_simulation

__all__ = [
    "CHECKS", "QUICK_CHECKS", "quick_checks", "CheckResult", "Settings", "run_checks", "format_table", "to_json", "passed", "build", "kind_of",
    "OK", "FAIL", "WARN", "NA", "KS_LEVEL",
    "forward_simulation", "moment_odes", "kernel_methods", "prior_gap", "prior_gap_simulated", "time_sampler",
    "float32_precision", "step_methods", "general_methods", "coupled_forward_simulation", "coupled_moment_odes", "coupled_kernel_methods",
    "coupled_prior_gap", "hybrid_score", "gaussian_kl", "prior_gaussian", "ks_uniform", "ks_critical",
]


def _without_kernel(sde, settings: Settings) -> list[CheckResult]:
    reason = dict(getattr(sde, "unavailable", {})).get("marginal_prob", "the module has no Gaussian kernel")
    return not_applicable(("forward EM: mean", "forward EM: variance", "m' = a m", "c' = a c + b",
                           "v' = 2 a v + g^2", "kernel methods agree"), reason)


CHECKS: dict[str, tuple[Callable, ...]] = {
    "affine": (forward_simulation, moment_odes, kernel_methods, step_methods, prior_gap, time_sampler,
               float32_precision),
    "general": (_without_kernel, general_methods, prior_gap_simulated, time_sampler, float32_precision),
    "coupled": (coupled_forward_simulation, coupled_moment_odes, coupled_kernel_methods, coupled_prior_gap,
                time_sampler, float32_precision, hybrid_score),
}


# The checks without Monte Carlo paths: a tenth of a second, so `sdelang train` and `sample` run them and
# warn (the simulations stay with `sdelang check`).
QUICK_CHECKS: dict[str, tuple[Callable, ...]] = {
    "affine": (moment_odes, kernel_methods, step_methods, prior_gap, time_sampler, float32_precision),
    "general": (general_methods, time_sampler, float32_precision),
    "coupled": (coupled_moment_odes, coupled_kernel_methods, coupled_prior_gap, time_sampler, float32_precision),
}


def quick_checks(sde, seed: int = 0) -> list[CheckResult]:
    """The failed rows of QUICK_CHECKS for the module's kind (an empty list when all pass)."""
    settings = Settings(paths=4096, steps=DEFAULT_STEPS, seed=seed)
    double = copy.deepcopy(sde).to("cpu", torch.float64)
    with torch.no_grad():
        rows = [row for check in QUICK_CHECKS.get(kind_of(sde), ()) for row in check(double, settings)]
    return [row for row in rows if row.status == FAIL]


def run_checks(sde, *, paths: int = DEFAULT_PATHS, steps: int = DEFAULT_STEPS, seed: int = 0,
               data_std: float = 1.0) -> list[CheckResult]:
    """Every check for the module's kind, on a float64 copy of `sde` on its device (float32 for the
    precision check); `sde` itself is left as it is."""
    if paths < 100:
        raise ValueError(f"paths must be at least 100 for the Monte Carlo checks, got {paths}")
    if steps < 10:
        raise ValueError(f"steps must be at least 10, got {steps}")
    if not (math.isfinite(data_std) and 0 < data_std <= 1e100):
        # Past 1e100 its square times the kernel's overflows float64 (1e160 gave an OverflowError).
        raise ValueError(f"the data standard deviation must be positive and at most 1e100, got {data_std}")
    kind = kind_of(sde)
    if kind not in CHECKS:
        raise ValueError(f"sdelang check does not know modules of kind {kind!r} (it knows {', '.join(CHECKS)})")
    settings = Settings(paths=paths, steps=steps, seed=seed, data_std=data_std)
    double = copy.deepcopy(sde).double()
    with torch.no_grad():
        return [row for check in CHECKS[kind] for row in check(double, settings)]


def build(path: str, params: dict[str, float]):
    """The SDE module of a .sde file (compiled through the loader's cache) with parameters overridden,
    in float64 on the CPU; an unknown parameter name is a user error."""
    module = load_module(path)
    known = [name for name in inspect.signature(module.SDE).parameters if name != "N"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        hint = f"the parameters are: {', '.join(known)}" if known else "the program declares no parameters"
        raise SdeError(f"{path}: unknown parameter '{unknown[0]}'", hint=hint)
    # Through load(): values far from the program's defaults, which its forms cannot take, recompile it with them.
    return load(path, **params).to("cpu", torch.float64)
