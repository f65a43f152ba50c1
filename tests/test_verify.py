"""`sdelang check` (sdelang/verify/): every example passes, every check can fail.

Each check is run on the golden modules and on deliberately broken subclasses of them (a wrong std, a
forgotten v0, a flipped offset, a swapped inverse CDF, a naive float32 formula; for coupled SDEs a kernel
without its initial law, a transposed Phi, a table built by the wrong rule, a marginal instead of a
conditional score...), which must each be reported as FAIL by the check meant to catch them. Monte Carlo
checks use fixed seeds; their tolerances are the module's own (5 standard errors plus the estimated
Euler-Maruyama bias, a KS test at level 1e-3).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import sdelang
from sdelang import verify
from sdelang.cli import main
from sdelang.verify.common import comparison_times
from sdelang.verify.moments import derivatives
from sdelang.verify.sampler import density_integral
from sdelang.verify.simulation import euler_grid

ROOT = Path(__file__).resolve().parents[1]
ALL = ["ve", "vp", "subvp", "vp_likelihood", "cosine_vp", "edm_ve", "ou", "numeric"]
FAST = verify.Settings(paths=4096, steps=400)  # ~0.2 s per example; the default is 8 times the paths


def statuses(rows) -> dict[str, str]:
    return {row.name: row.status for row in rows}


def original(self, name: str):
    """The golden module's method `name`, bound to an instance of a broken subclass."""
    return getattr(super(type(self), self), name)


def broken(example, **methods):
    """An instance of a subclass of the example's golden module with some methods replaced, in float64. The
    module's own check at construction would refuse most of these doubles first; they test `sdelang check`."""
    cls = type(f"Broken{example.module.SDE.__name__}", (example.module.SDE,),
               {"_check_parameters": lambda self: None, **methods})
    return cls().double()


# -- Every example passes -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_every_example_passes_every_check(examples, name):
    rows = verify.run_checks(examples[name].build(), paths=FAST.paths, steps=FAST.steps)
    assert [r.status for r in rows if r.status != verify.OK] == [], verify.format_table(rows)
    assert {r.name for r in rows} >= {"forward EM: mean", "forward EM: variance", "m' = a m", "c' = a c + b",
                                      "v' = 2 a v + g^2", "kernel methods agree", "discretize vs kernel",
                                      "drift_divergence = d a(t)", "reverse: f - g^2 s", "prior: logp vs sampling",
                                      "KL(p_T || prior)", "I(x0; x_T)", "t_density integrates to t_cdf",
                                      "t_icdf inverts t_cdf", "sample_t vs t_cdf (KS)", "float32 vs float64"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", ["vp_likelihood", "cld"])
def test_run_checks_on_a_float32_module_on_any_device(all_examples, name, device):
    """The checks run on a float64 copy on the module's device; the module itself is left as it was."""
    sde = all_examples[name].build(dtype=torch.float32).to(device)
    rows = verify.run_checks(sde, paths=FAST.paths, steps=FAST.steps)
    assert [r.status for r in rows if r.status != verify.OK] == [], verify.format_table(rows)
    assert sde._anchor.dtype == torch.float32 and sde._anchor.device.type == device


def test_bad_settings_are_value_errors(examples):
    sde = examples["vp"].build()
    for kwargs in (dict(paths=10), dict(steps=2), dict(data_std=0.0), dict(data_std=math.nan), dict(data_std=1e160)):
        with pytest.raises(ValueError):
            verify.run_checks(sde, **kwargs)


# -- 1. Forward simulation ----------------------------------------------------------------------------

def test_simulation_catches_a_forgotten_v0(examples):
    """VE with v(t) = sigma(t)^2 - sigma_min^2 (v0 dropped): the moment ODE v' = g^2 still holds, so only
    the simulation, which starts from x0 + sqrt(v0) z, can see it."""
    ve = examples["ve"]

    def marginal_prob(self, x0, t):
        return x0, torch.sqrt(self.std(t) ** 2)

    def std(self, t):
        return torch.sqrt((self.sigma_max**t * self.sigma_min ** (1 - t)) ** 2 - self.sigma_min**2)

    sde = broken(ve, marginal_prob=marginal_prob, std=std)
    assert statuses(verify.moment_odes(sde, FAST))["v' = 2 a v + g^2"] == verify.OK
    rows = statuses(verify.forward_simulation(sde, FAST))
    assert rows == {"forward EM: mean": verify.OK, "forward EM: variance": verify.FAIL}


def test_simulation_catches_a_flipped_offset(examples):
    """OU with c(t) = -mu (1 - exp(-theta t)): the mean is wrong, the variance right."""
    def marginal_prob(self, x0, t):
        mean, std = original(self, "marginal_prob")(x0, t)
        return mean - 2 * self._expand(self.mean_offset(t), x0), std

    sde = broken(examples["ou"], marginal_prob=marginal_prob)
    rows = statuses(verify.forward_simulation(sde, FAST))
    assert rows == {"forward EM: mean": verify.FAIL, "forward EM: variance": verify.OK}
    assert statuses(verify.moment_odes(sde, FAST))["c' = a c + b"] == verify.FAIL


def test_simulation_catches_a_ten_percent_std(examples):
    def marginal_prob(self, x0, t):
        mean, std = original(self, "marginal_prob")(x0, t)
        return mean, 1.1 * std

    rows = statuses(verify.forward_simulation(broken(examples["cosine_vp"], marginal_prob=marginal_prob), FAST))
    assert rows == {"forward EM: mean": verify.OK, "forward EM: variance": verify.FAIL}


def test_simulation_catches_a_drift_that_disagrees_with_the_kernel(examples):
    def sde_(self, x, t):
        drift, g = original(self, "sde")(x, t)
        return 1.5 * drift, g

    sde = broken(examples["vp"], sde=sde_)
    assert statuses(verify.forward_simulation(sde, FAST))["forward EM: mean"] == verify.FAIL
    assert statuses(verify.moment_odes(sde, FAST))["m' = a m"] == verify.FAIL


class RootNoise(torch.nn.Module):
    """dx = g dw with g(t)^2 = 1 / (2 sqrt(t)), infinite at t = 0: v(t) = sqrt(t), m = 1, c = 0.
    `scale` multiplies the stated variance (1: correct)."""

    eps, T, v0 = 1e-3, 1.0, 0.0

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale
        self.register_buffer("_anchor", torch.zeros((), dtype=torch.float64), persistent=False)

    @staticmethod
    def _expand(v, x):
        return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))

    def sde(self, x, t):
        return torch.zeros_like(x), (0.5 / t.sqrt()).sqrt()

    def marginal_prob(self, x0, t):
        return x0 + 0 * self._expand(t, x0), (self.scale * t.sqrt()).sqrt()


def test_simulation_starts_at_eps_when_the_coefficients_blow_up_at_zero():
    rows = verify.forward_simulation(RootNoise(), FAST)
    assert [r.status for r in rows] == [verify.OK, verify.OK]
    assert "from t = 0.001" in rows[0].note
    wrong = statuses(verify.forward_simulation(RootNoise(scale=1.3), FAST))
    assert wrong["forward EM: variance"] == verify.FAIL


def test_euler_grid_passes_through_the_times_with_even_spans(examples):
    sde = examples["edm_ve"].build()
    times = comparison_times(sde, 0.0)
    grid = euler_grid(sde, 0.0, 0.0, times, 300, sde._anchor)
    assert grid[0] == 0.0 and grid[-1] == sde.T
    assert np.all(np.diff(grid) > 0)
    assert 300 <= len(grid) - 1 <= 300 + 2 * len(times)
    at = [int(np.flatnonzero(grid == t)[0]) for t in times]   # every time is a grid point ...
    assert all(i % 2 == 0 for i in at)                          # ... of the coarse grid too
    # EDM's g^2 = 2 t: the clock crowds steps towards t = 0 (half of them below T / 100).
    assert np.mean(grid < sde.T / 100) > 0.3


def stiff_vp(beta_max: float):
    return sdelang.load(ROOT / "examples" / "vp.sde", beta_max=beta_max).double()


def test_a_stiff_vp_passes_with_the_steps_it_needs():
    """A VP with beta_max = 1e4 is right, but m(1/2) = e^-625 is subnormal in float64, log_snr reaches -5000 and
    |a| = 5000: the moment ODE, log_snr and float32 rows failed on it, and Euler-Maruyama with 1000 steps
    exploded (EM mean 2.5e74 passed as 'ok' under its own bias estimate). Now the quick rows pass, and the
    simulation raises its steps until |df/dx| dt <= 0.25; at 400 steps that would take more than 16 times as
    many, so it says what to run instead of comparing."""
    sde = stiff_vp(1e4)
    assert verify.quick_checks(sde) == []
    rows = verify.forward_simulation(sde, verify.Settings(paths=1024, steps=1000))
    assert [r.status for r in rows] == [verify.OK, verify.OK], verify.format_table(rows)
    assert "raised from 1000" in rows[0].note
    rows = verify.forward_simulation(sde, verify.Settings(paths=1024, steps=400))
    assert [r.status for r in rows] == [verify.NA, verify.NA] and "rerun with --steps" in rows[0].note


def test_step_methods_hold_g_to_the_steps_own_variance():
    """A state that grows, dx = 12 x dt + dw: v(t) ~ e^{24 t} / 24, so G^2 = v(t) - r^2 v(s) cancels over a step
    and a module computing it that way loses 4 digits (what tables did: G = 0 for such a process). The kernel-based
    comparison shares the cancellation and its tolerance grows with v; the comparison with the step's variance
    from sde() (w' = 2 a w + g^2) catches it. The compiled module itself passes."""
    from conftest import import_code
    code = sdelang.compile_source(sdelang.Source("sde grows\ndx = 12 * x dt + dw\n", "grows.sde")).code
    SDE = import_code(code, "sdelang_test_verify_grows").SDE
    assert statuses(verify.step_methods(SDE().double(), FAST))["discretize vs kernel"] == verify.OK

    class Cancelling(SDE):
        def discretize(self, x, t, s=None):
            f, _ = super().discretize(x, t, s)
            s = torch.clamp(t - self.T / self.N, min=0.0) if s is None else s
            r = self.mean_coeff(t) / self.mean_coeff(s)
            return f, (self.std(t) ** 2 - r**2 * self.std(s) ** 2).clamp(min=0).sqrt()
    row = verify.step_methods(Cancelling().double(), FAST)[0]
    assert row.status == verify.FAIL and "w' = 2 a w + g^2" in row.note, row


def test_float32_log_snr_is_held_to_its_spacing_only_where_it_is_large():
    from sdelang.verify.precision import _absolute
    high = torch.tensor([0.5, -300.0, -5000.0], dtype=torch.float64)
    rounding = high.float().double() + torch.tensor([0.0, 0.0, 2.4e-4], dtype=torch.float64)  # half a unit at 5000
    assert (_absolute(rounding, high) <= verify.common.FLOAT32_BOUND).all()
    for i, error in ((0, 2e-4), (1, 3e-2), (2, 0.5)):   # 1e-4 of |log_snr| at -300 and -5000 is a real error
        wrong = high.clone()
        wrong[i] += error
        assert _absolute(wrong, high)[i] > verify.common.FLOAT32_BOUND


# -- 2. Moment ODEs and the other kernel methods ------------------------------------------------------

def test_moment_odes_catch_a_one_percent_std(examples):
    def marginal_prob(self, x0, t):
        mean, std = original(self, "marginal_prob")(x0, t)
        return mean, 1.01 * std

    sde = broken(examples["vp"], marginal_prob=marginal_prob)
    rows = {r.name: r for r in verify.moment_odes(sde, FAST)}
    assert rows["v' = 2 a v + g^2"].status == verify.FAIL
    assert rows["v' = 2 a v + g^2"].measured > 1e-3
    assert rows["m' = a m"].status == verify.OK
    assert statuses(verify.kernel_methods(sde, FAST)) == {"kernel methods agree": verify.FAIL}


def test_moment_odes_catch_a_wrong_diffusion(examples):
    def sde_(self, x, t):
        drift, g = original(self, "sde")(x, t)
        return drift, 1.02 * g

    rows = statuses(verify.moment_odes(broken(examples["numeric"], sde=sde_), FAST))
    assert rows == {"m' = a m": verify.OK, "c' = a c + b": verify.OK, "v' = 2 a v + g^2": verify.FAIL}


def test_finite_difference_error_estimate_covers_the_true_error():
    """On fn = exp(5 t), with the step and stencils moment_odes uses, |D(h) - f'| <= the estimate."""
    t = torch.tensor([0.0, 0.3, 0.99, 1.0], dtype=torch.float64)
    h = torch.full_like(t, 1e-2)
    d, truncation, _ = derivatives(lambda s: torch.exp(5 * s), t, h, 0.0, 1.0)
    error = (d - 5 * torch.exp(5 * t)).abs()
    assert torch.all(error <= 1.5 * truncation)
    assert torch.all(truncation <= 10 * error)   # and does not overstate it


def test_kernel_methods_catch_a_wrong_log_snr(examples):
    def log_snr(self, t):
        return original(self, "log_snr")(t) + 1e-6

    rows = statuses(verify.kernel_methods(broken(examples["subvp"], log_snr=log_snr), FAST))
    assert rows == {"kernel methods agree": verify.FAIL}


@pytest.mark.parametrize("method, broken_method, row", [
    ("discretize", lambda o: lambda x, t, s=None: (o(x, t, s)[0], o(x, t, s)[1] * (1 + 1e-6)), "discretize vs kernel"),
    ("discretize", lambda o: lambda x, t, s=None: (o(x, t, s)[0] * (1 + 1e-6), o(x, t, s)[1]), "discretize vs kernel"),
    ("discretize", lambda o: lambda x, t, s=None: o(x, t), "discretize vs kernel"),   # ignores the step's start
    ("drift_divergence", lambda o: lambda x, t: -o(x, t), "drift_divergence = d a(t)"),
    ("drift_divergence", lambda o: lambda x, t: o(x, t) / x[0].numel(), "drift_divergence = d a(t)"),
    ("reverse", lambda o: lambda score_fn, probability_flow=False: o(score_fn, False), "reverse: f - g^2 s"),
])
def test_step_methods_catch_a_wrong_step_divergence_or_reverse(examples, method, broken_method, row):
    """discretize off by a millionth in G or f, or ignoring s; drift_divergence of the wrong sign or per entry;
    reverse() ignoring probability_flow: each fails its row of step_methods, and only that row (OU: c != 0)."""
    def replaced(self, *args, **kwargs):
        return broken_method(original(self, method))(*args, **kwargs)

    assert statuses(verify.step_methods(examples["ou"].build(), FAST)) == {
        "discretize vs kernel": verify.OK, "drift_divergence = d a(t)": verify.OK, "reverse: f - g^2 s": verify.OK}
    rows = statuses(verify.step_methods(broken(examples["ou"], **{method: replaced}), FAST))
    assert rows[row] == verify.FAIL
    assert all(status == verify.OK for name, status in rows.items() if name != row)


# -- 3. Prior and KL(p_T || prior) ----------------------------------------------------------------------

def test_gaussian_kl_matches_torch_distributions():
    for mean, var, mu, V in [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.0, 2.0), (5.0, 100.0, 0.0, 6400.0)]:
        expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, math.sqrt(var)),
                                                     torch.distributions.Normal(mu, math.sqrt(V)))
        assert verify.gaussian_kl(mean, var, mu, V) == pytest.approx(float(expected), rel=1e-6, abs=1e-12)


def test_prior_gaussian_reads_a_scalar_prior_off_prior_logp(examples):
    mu, V, misfit = verify.prior_gaussian(examples["ou"].build(dict(theta=0.5, mu=-1.5)))
    assert mu[0] == pytest.approx(-1.5 * -math.expm1(-0.5 * 5), rel=1e-12)
    assert V[0, 0] == pytest.approx(2 / (2 * 0.5) * -math.expm1(-2 * 0.5 * 5), rel=1e-12)
    assert misfit < 1e-12


def test_prior_gaussian_reads_wide_and_distant_priors(examples):
    """Read at unit offsets from 0, the precision 1/V drowns in the rounding of log N where V >> 1 or the mean is
    far from 0: VE with sigma_max = 3000 gave V 1.3e-8 off, a misfit of 3.5e-8 that failed the row, sigma_max = 1e8
    no reading at all, OU with mu = 1e6 a misfit of 5.9e3. Read again one standard deviation from the mean, V and
    mu are exact to the rounding of prior_logp itself (of u - mu at |u| = 1e6 for OU: 1e-10 of V)."""
    for sigma_max in (3000.0, 1e8):
        mu, V, misfit = verify.prior_gaussian(examples["ve"].build(dict(sigma_max=sigma_max)))
        assert V[0, 0] == pytest.approx(sigma_max**2, rel=1e-12) and abs(mu[0]) <= 1e-12 * sigma_max
        assert misfit < 1e-12
    mu, V, misfit = verify.prior_gaussian(examples["ou"].build(dict(theta=0.5, mu=1e6)))
    assert mu[0] == pytest.approx(1e6 * -math.expm1(-0.5 * 5), rel=1e-12)
    assert V[0, 0] == pytest.approx(2 / (2 * 0.5) * -math.expm1(-2 * 0.5 * 5), rel=1e-9)
    assert misfit < 1e-9
    rows = statuses(verify.prior_gap(examples["ve"].build(dict(sigma_max=3000.0)), FAST))
    assert set(rows.values()) == {verify.OK}


def test_kl_for_ve_matches_the_closed_form(examples):
    """VE: m = 1 and v(T) = sigma_max^2 = the prior's variance, so p_T = N(0, s^2 + sigma_max^2) and
    KL = 1/2 (r - 1 - log r), r = 1 + s^2 / sigma_max^2."""
    sde = examples["ve"].build(dict(sigma_max=5.0))
    rows = {r.name: r for r in verify.prior_gap(sde, verify.Settings(paths=4096, data_std=2.0))}
    r = 1 + 4 / 25
    assert rows["KL(p_T || prior)"].measured == pytest.approx(0.5 * (r - 1 - math.log(r)), rel=1e-9)
    assert rows["KL(p_T || prior)"].status == verify.OK             # 0.0058 nats
    assert rows["I(x0; x_T)"].measured == pytest.approx(0.5 * math.log(r), rel=1e-9)
    assert rows["I(x0; x_T)"].status == verify.WARN                 # 0.074 nats


def test_short_vp_warns_through_the_information_left_at_t(examples):
    """VP with beta_max = 2: x_T keeps m(T) = 0.59 of x0. For unit-variance data p_T is still N(0, 1)
    (VP preserves variance), so KL(p_T || prior) = 0 and only I(x0; x_T) can warn; for s = 0.5 both do."""
    sde = examples["vp"].build(dict(beta_max=2.0))
    unit = {r.name: r for r in verify.prior_gap(sde, FAST)}
    assert unit["KL(p_T || prior)"].status == verify.OK
    assert unit["I(x0; x_T)"].status == verify.WARN
    B = 0.1 + 0.95   # int_0^1 beta
    assert unit["I(x0; x_T)"].measured == pytest.approx(0.5 * math.log1p(math.exp(-B) / -math.expm1(-B)))
    assert "raise T or the diffusion" in unit["I(x0; x_T)"].note
    half = {r.name: r for r in verify.prior_gap(sde, verify.Settings(paths=4096, data_std=0.5))}
    assert half["KL(p_T || prior)"].status == verify.WARN
    default = statuses(verify.prior_gap(examples["vp"].build(), FAST))
    assert set(default.values()) == {verify.OK}


def test_prior_checks_catch_a_wrong_sampler_and_an_unnormalised_logp(examples):
    ve = examples["ve"]

    def prior_sampling(self, shape, generator=None):
        mean, variance = self._prior()
        z = torch.randn(*shape, generator=generator, dtype=self._anchor.dtype)
        return z * variance + mean          # variance where its square root belongs

    rows = statuses(verify.prior_gap(broken(ve, prior_sampling=prior_sampling), FAST))
    assert rows["prior: logp vs sampling"] == verify.FAIL

    def prior_logp(self, z):
        return original(self, "prior_logp")(z) + 0.1

    rows = statuses(verify.prior_gap(broken(ve, prior_logp=prior_logp), FAST))
    assert rows == {"prior: logp vs sampling": verify.FAIL, "KL(p_T || prior)": verify.NA, "I(x0; x_T)": verify.NA}


# -- 4. The training-time sampler ---------------------------------------------------------------------

def test_time_sampler_catches_a_swapped_inverse_cdf(examples):
    def t_icdf(self, u):
        return self.eps + u * (self.T - self.eps)

    rows = statuses(verify.time_sampler(broken(examples["vp_likelihood"], t_icdf=t_icdf), FAST))
    assert rows == {"t_density integrates to t_cdf": verify.OK, "t_density form (importance)": verify.OK,
                    "t_icdf inverts t_cdf": verify.FAIL, "sample_t vs t_cdf (KS)": verify.FAIL}


def test_time_sampler_catches_an_unnormalised_density(examples):
    def t_density(self, t):
        return 1.01 * original(self, "t_density")(t)

    rows = statuses(verify.time_sampler(broken(examples["edm_ve"], t_density=t_density), FAST))
    assert rows["t_density integrates to t_cdf"] == verify.FAIL
    assert rows["t_density form (importance)"] == verify.OK


def test_density_integral_refines_across_a_kink(examples):
    """A density with a kink, q ~ 1 + 10 |t - c| (the likelihood weighting of beta = 1 + 10 |t - c|): panels fixed
    across the kink integrated it to ~1e-7 and failed a right module; they are halved where they disagree with their
    halves. A 1e-6 error in t_cdf still fails."""
    c = 0.4137

    def F(t):   # int_0^t (1 + 10 |s - c|) ds
        return t + 5 * ((t - c) * (t - c).abs() + c**2)

    def t_cdf(self, t):
        return (F(t) - F(torch.full_like(t, self.eps))) / (F(torch.full_like(t, self.T)) - F(torch.full_like(t, self.eps)))

    def t_density(self, t):
        return (1 + 10 * (t - c).abs()) / (F(torch.full_like(t, self.T)) - F(torch.full_like(t, self.eps)))

    row = density_integral(broken(examples["vp"], t_cdf=t_cdf, t_density=t_density))
    assert row.status == verify.OK and row.measured < 1e-12, row
    shifted = broken(examples["vp"], t_cdf=lambda self, t: t_cdf(self, t) + 1e-6 * t, t_density=t_density)
    assert density_integral(shifted).status == verify.FAIL


def test_step_variance_leaves_out_steps_runge_kutta_cannot_resolve():
    """T = 1e20: the module's own step is 1e17 and Runge-Kutta on it diverges (NaN): those times have no reference
    and are left out instead of failing the row."""
    from conftest import import_code
    code = sdelang.compile_source(sdelang.Source("sde big\ndx = -x dt + sqrt(1 + t) dw\nt in [1e-5, 1e20]\n",
                                                 "big.sde")).code
    sde = import_code(code, "sdelang_test_verify_big").SDE().double()
    assert statuses(verify.step_methods(sde, FAST))["discretize vs kernel"] == verify.OK


def test_time_sampler_catches_a_density_of_the_wrong_form(examples):
    def t_density(self, t):   # a uniform sampler whose density tilts by 1 % across [eps, T]
        return original(self, "t_density")(t) * (1 + 0.01 * (t - 0.5))

    rows = statuses(verify.time_sampler(broken(examples["vp"], t_density=t_density), FAST))
    assert rows["t_density form (uniform)"] == verify.FAIL


def test_time_sampler_catches_draws_from_another_law(examples):
    def sample_t(self, batch_size, generator=None):
        u = torch.rand(batch_size, generator=generator, dtype=self._anchor.dtype)
        return self.t_icdf(u**1.5)

    rows = statuses(verify.time_sampler(broken(examples["numeric"], sample_t=sample_t), FAST))
    assert rows["sample_t vs t_cdf (KS)"] == verify.FAIL
    assert rows["t_icdf inverts t_cdf"] == verify.OK


def test_ks_matches_scipy():
    """The statistic exactly; Stephens' p-value within 5 % of the exact one for n >= 50 (measured: 3 %),
    and the critical value the check uses within 0.5 % (measured: 0.2 % for n >= 25)."""
    generator = torch.Generator().manual_seed(0)
    for n, power in ((50, 1.0), (2000, 1.0), (2000, 1.1), (30000, 1.02)):
        u = torch.rand(n, generator=generator, dtype=torch.float64) ** power
        d, p = verify.ks_uniform(u)
        reference = scipy.stats.kstest(u.numpy(), "uniform")
        assert d == pytest.approx(reference.statistic, rel=1e-12)
        assert p == pytest.approx(reference.pvalue, rel=0.05, abs=1e-6)
    for n in (25, 100, 1000, 8192):
        assert verify.ks_critical(n) == pytest.approx(scipy.stats.kstwo.ppf(1 - verify.KS_LEVEL, n), rel=0.005)


# -- 5. float32 ---------------------------------------------------------------------------------------

def test_float32_check_catches_the_naive_variance(examples):
    """sqrt(1 - exp(-B)) instead of sqrt(-expm1(-B)): right in float64 (to 1e-10 at eps), all digits lost
    in float32 at t = eps (MATH.md section 1)."""
    def std(self, t):
        B = self.beta_min * t + (self.beta_max - self.beta_min) * t**2 / 2
        return torch.sqrt(1 - torch.exp(-B))

    sde = broken(examples["vp"], std=std)
    assert statuses(verify.kernel_methods(sde, FAST)) == {"kernel methods agree": verify.OK}
    row = verify.float32_precision(sde, FAST)[0]
    assert row.status == verify.FAIL
    assert row.note.endswith("worst std at t = 1e-05")


def test_float32_check_reports_non_finite_values(examples):
    def weight(self, t):
        return torch.where(t < 2e-5, torch.full_like(t, math.inf), original(self, "weight")(t))

    row = verify.float32_precision(broken(examples["ve"], weight=weight), FAST)[0]
    assert row.status == verify.FAIL and row.measured == math.inf


# -- Kinds: general (no kernel) and coupled --------------------------------------------------------------

def general_vp(examples, beta_max=2.0):
    """The VP golden module posing as a kernel-free ("general") module: its kernel methods raise."""
    vp = examples["vp"].module.SDE

    def refuse(self, *args):
        raise AssertionError("a check used the kernel of a general module")

    def sde_(self, x, t):
        drift, g = vp.sde(self, x, t)
        return drift, self._expand(g, x).expand_as(x)

    def noise_gradient(self, x, t):   # g depends on t alone
        return torch.zeros_like(x)

    def euler(self, x, t, s=None):    # a general module's step
        drift, g = sde_(self, x, t)
        dt = self._expand(t - torch.clamp(t - self.T / self.N, min=0.0), x)
        return drift * dt, g * dt.sqrt()

    methods = dict(kind="general", unavailable={"marginal_prob": "no kernel (test double)"}, sde=sde_,
                   noise_gradient=noise_gradient, discretize=euler,
                   _check_parameters=lambda self: None,   # it reads the kernel, which this double refuses
                   **{name: refuse for name in ("marginal_prob", "std", "log_snr", "mean_coeff", "mean_offset")})
    return type("GeneralVP", (vp,), methods)(beta_max=beta_max).double()


def test_general_modules_get_n_a_and_a_simulated_kl(examples):
    """The simulated KL of VP posing as general, against the closed form for the real VP: data N(0, 0.5^2),
    beta_max = 2, p_T = N(0, m^2/4 + 1 - m^2), KL = 0.0210. Tolerance: 5 standard errors of the estimate by
    the delta method (|dKL/dvar| var sqrt(2/n)) plus 1e-4 for Euler-Maruyama's bias at 1000 steps (5e-6 by
    the exact moment recursion v <- (1 + a dt)^2 v + g^2 dt on the check's grid)."""
    settings = verify.Settings(paths=16384, steps=1000, data_std=0.5)
    rows = verify.run_checks(general_vp(examples), paths=settings.paths, steps=settings.steps, data_std=0.5)
    by_name = {r.name: r for r in rows}
    assert by_name["forward EM: mean"].status == verify.NA
    assert by_name["forward EM: mean"].note == "no kernel (test double)"
    assert "t_density form (uniform)" in by_name and "float32 vs float64" in by_name
    m2 = math.exp(-(0.1 + 0.95))
    variance = m2 / 4 + 1 - m2
    exact = verify.gaussian_kl(0.0, variance, 0.0, 1.0)
    se = abs(1 / 1.0 - 1 / variance) / 2 * variance * math.sqrt(2 / settings.paths)
    kl = by_name["KL(p_T || prior)"]
    assert kl.status == verify.WARN and kl.note.startswith("estimate")
    assert abs(kl.measured - exact) <= 5 * se + 1e-4
    assert verify.passed(rows)


GENERAL = "sde noisy_well\ndx = (x - x^3) dt + sqrt(1 + x^2 / 2) dw\nt in [1e-3, 2]\nprior normal(0, 1)\nweighting 1\n"


@pytest.mark.parametrize("method, broken_method, failing", [
    # reverse() reads noise_gradient, so its row fails too
    ("noise_gradient", lambda o: lambda x, t: 2 * o(x, t), {"noise_gradient = autograd", "reverse: f - (g^2)' - g^2 s"}),
    ("drift_divergence", lambda o: lambda x, t: o(x, t) / x[0].numel(), {"drift_divergence = autograd"}),
    ("discretize", lambda o: lambda x, t, s=None: (o(x, t, s)[0], o(x, t, s)[1] ** 2), {"discretize: Euler step"}),
])
def test_general_methods_catch_a_wrong_gradient_divergence_or_step(method, broken_method, failing):
    """A general module's noise gradient twice too large, its divergence per entry, its Euler noise squared: each
    fails its rows of general_methods (autograd of sde() is the reference), and only those."""
    module = type(sdelang.load(GENERAL))
    assert {r.status for r in verify.general_methods(module().double(), FAST)} == {verify.OK}

    def replaced(self, *args, **kwargs):
        return broken_method(getattr(module, method).__get__(self))(*args, **kwargs)

    rows = statuses(verify.general_methods(type("Broken", (module,), {method: replaced})().double(), FAST))
    assert {name for name, status in rows.items() if status == verify.FAIL} == failing


def test_general_methods_catch_a_reverse_without_the_noise_gradient():
    """The reverse drift of a state-dependent noise is f - d(g^2)/dx - g^2 s; one that leaves d(g^2)/dx out fails."""
    module = type(sdelang.load(GENERAL))

    class Flat(module):   # the same f and g, with d(g^2)/dx taken as 0
        def noise_gradient(self, x, t):
            return torch.zeros_like(x)

    class Broken(module):
        def reverse(self, score_fn, probability_flow=False):
            return Flat().double().reverse(score_fn, probability_flow)

    rows = statuses(verify.general_methods(Broken().double(), FAST))
    assert {name for name, status in rows.items() if status == verify.FAIL} == {"reverse: f - (g^2)' - g^2 s"}


def test_a_compiled_general_sde(tmp_path):
    """dx = -x^3 dt + sqrt(2) dw has the stationary law ~ exp(-x^4 / 4), variance 2 Gamma(3/4) / Gamma(1/4)
    = 0.676; at T = 3 from N(0, 1) data p_T is close to it, so a prior N(0, 0.676) gives a small KL."""
    variance = 2 * math.gamma(0.75) / math.gamma(0.25)
    path = tmp_path / "double_well.sde"
    path.write_text(f"sde double_well\ndx = -x^3 dt + sqrt(2) dw\nt in [1e-3, 3]\nprior normal(0, {variance:.6f})\n")
    sde = sdelang.load(path)
    assert verify.kind_of(sde) == "general"
    rows = {r.name: r for r in verify.run_checks(sde, paths=FAST.paths, steps=FAST.steps)}
    assert rows["KL(p_T || prior)"].status == verify.OK
    assert rows["m' = a m"].status == verify.NA and "not affine" in rows["m' = a m"].note
    assert all(r.status in (verify.OK, verify.NA) for r in rows.values())


def test_unknown_kinds_are_refused(examples):
    cls = type("Odd", (examples["vp"].module.SDE,), dict(kind="matrix"))
    with pytest.raises(ValueError, match="kind 'matrix'"):
        verify.run_checks(cls())


# -- Coupled SDEs: the golden CLD and underdamped modules, and broken subclasses of CLD --------------------

COUPLED = ["cld", "underdamped"]
COUPLED_ROWS = ["forward EM: mean", "forward EM: covariance", "Phi' = F Phi", "Sigma' = F Sigma + Sigma F^T + D",
                "kernel methods agree", "prior: logp vs sampling", "KL(p_T || prior)", "I(x0; u_T)",
                "t_density integrates to t_cdf", "t_density form (importance)", "t_icdf inverts t_cdf",
                "sample_t vs t_cdf (KS)", "float32 vs float64", "noise_to_score = kernel score",
                "E[g^2 noise_to_score^2] = weight"]


@pytest.mark.parametrize("name", COUPLED)
def test_every_coupled_example_passes_every_check(other_examples, name):
    rows = verify.run_checks(other_examples[name].build(), paths=FAST.paths, steps=FAST.steps)
    assert [r.name for r in rows] == COUPLED_ROWS
    assert [r.status for r in rows if r.status != verify.OK] == [], verify.format_table(rows)


def test_coupled_simulation_catches_a_kernel_without_the_initial_law(other_examples):
    """Sigma = Q(B(t)), Sigma0 = diag(0, gamma M) dropped: Q solves the same moment ODE (from Q(0) = 0), so only
    the simulation, which starts v from its initial law, and the kernel-methods row see it."""
    def kernel(self, t):
        return self.transition(self.time_change(t.to(torch.float64)))

    sde = broken(other_examples["cld"], kernel=kernel)
    assert statuses(verify.coupled_moment_odes(sde, FAST)) == {"Phi' = F Phi": verify.OK,
                                                               "Sigma' = F Sigma + Sigma F^T + D": verify.OK}
    rows = statuses(verify.coupled_forward_simulation(sde, FAST))
    assert rows == {"forward EM: mean": verify.OK, "forward EM: covariance": verify.FAIL}


def test_coupled_simulation_catches_a_transposed_phi_in_the_mean(other_examples):
    """mean = Phi^T u0 instead of Phi u0: v's mean gets M^-1 beta t e^-a x0 instead of -beta t e^-a x0."""
    def marginal_prob(self, x0, t):
        _, Sigma = original(self, "marginal_prob")(x0, t)
        Phi = self.kernel(t)[0].transpose(1, 2).to(x0.dtype)
        return self.join(self._expand(Phi[:, i, self.data_index], x0) * x0 for i in range(2)), Sigma

    sde = broken(other_examples["cld"], marginal_prob=marginal_prob)
    rows = statuses(verify.coupled_forward_simulation(sde, FAST))
    assert rows == {"forward EM: mean": verify.FAIL, "forward EM: covariance": verify.OK}
    assert statuses(verify.coupled_kernel_methods(sde, FAST)) == {"kernel methods agree": verify.FAIL}


def test_coupled_simulation_and_odes_catch_a_drift_that_disagrees_with_the_kernel(other_examples):
    def sde_(self, u, t):
        drift, g = original(self, "sde")(u, t)
        return 1.5 * drift, g

    sde = broken(other_examples["cld"], sde=sde_)
    assert statuses(verify.coupled_forward_simulation(sde, FAST))["forward EM: mean"] == verify.FAIL
    assert statuses(verify.coupled_moment_odes(sde, FAST))["Phi' = F Phi"] == verify.FAIL


def test_coupled_odes_catch_a_one_percent_transition_noise(other_examples):
    """Q(r) 1 % too large: kernel() and the semigroup stay consistent with it (Q(r + s) = Phi Q(r) Phi^T + Q(s)
    is linear in Q), so only Sigma' = F Sigma + Sigma F^T + D can see it."""
    def transition(self, r):
        Phi, Q = original(self, "transition")(r)
        return Phi, 1.01 * Q

    sde = broken(other_examples["cld"], transition=transition)
    rows = {r.name: r for r in verify.coupled_moment_odes(sde, FAST)}
    assert rows["Phi' = F Phi"].status == verify.OK
    assert rows["Sigma' = F Sigma + Sigma F^T + D"].status == verify.FAIL
    assert rows["Sigma' = F Sigma + Sigma F^T + D"].measured > 1e-3
    assert statuses(verify.coupled_kernel_methods(sde, FAST)) == {"kernel methods agree": verify.OK}


def test_coupled_odes_catch_a_wrong_noise_and_a_wrong_clock(other_examples):
    def sde_(self, u, t):
        drift, g = original(self, "sde")(u, t)
        return drift, 1.02 * g

    rows = statuses(verify.coupled_moment_odes(broken(other_examples["underdamped"], sde=sde_), FAST))
    assert rows == {"Phi' = F Phi": verify.OK, "Sigma' = F Sigma + Sigma F^T + D": verify.FAIL}

    def time_change(self, t):   # B(t) 1 % fast: the kernel runs ahead of sde()
        return 1.01 * t

    sde = broken(other_examples["cld"], time_change=time_change)
    assert set(statuses(verify.coupled_moment_odes(sde, FAST)).values()) == {verify.FAIL}
    assert statuses(verify.coupled_kernel_methods(sde, FAST)) == {"kernel methods agree": verify.OK}


@pytest.mark.parametrize("method, caught_by", [("weight", "weight = sum_k g_k^2 (Sigma^-1)_kk"),
                                               ("drift_divergence", "drift_divergence = tr F(t)"),
                                               ("diffusion", "g^2 of sde() = profile(t) diag(D0)")])
def test_coupled_kernel_methods_catch_a_method_off_by_a_millionth(other_examples, method, caught_by):
    """(sde() takes its g from diffusion(), so a wrong diffusion() shows as a g that is not profile(t) D0.)"""
    def off(self, *args):
        return original(self, method)(*args) * (1 + 1e-6)

    rows = verify.coupled_kernel_methods(broken(other_examples["underdamped"], **{method: off}), FAST)
    assert rows[0].status == verify.FAIL and rows[0].note.split("worst ")[1].startswith(caught_by)


def test_gaussian_kl_in_k_dimensions_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    for K in (1, 2, 3):
        A, B = (torch.randn(K, K, generator=generator, dtype=torch.float64) for _ in range(2))
        S, V = A @ A.T + 0.1 * torch.eye(K, dtype=torch.float64), B @ B.T + 0.1 * torch.eye(K, dtype=torch.float64)
        m, mu = (torch.randn(K, generator=generator, dtype=torch.float64) for _ in range(2))
        expected = torch.distributions.kl_divergence(torch.distributions.MultivariateNormal(m, S),
                                                     torch.distributions.MultivariateNormal(mu, V))
        assert verify.gaussian_kl(m.numpy(), S.numpy(), mu.numpy(), V.numpy()) == pytest.approx(float(expected),
                                                                                               rel=1e-10)


def test_prior_gaussian_reads_the_coupled_prior_off_prior_logp(other_examples):
    """The prior of a coupled module is the kernel at T without the data term: N(Phi(T) u0_aux, Sigma(T))."""
    sde = other_examples["underdamped"].build(dict(beta=1.0))
    mu, V, misfit = verify.prior_gaussian(sde)
    _, Sigma = sde.kernel(torch.tensor([float(sde.T)], dtype=torch.float64))
    np.testing.assert_allclose(V, Sigma[0].numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mu, 0.0, atol=1e-9)
    assert misfit < 1e-10


def test_a_slow_cld_warns_with_the_closed_form_kl_and_information(other_examples):
    """CLD with beta = 0.5: u_T keeps much of x0. p_T = N(0, Sigma_T + c c^T) for unit-variance data,
    c = Phi(T) e_x, against the prior N(0, Sigma_T): KL from torch.distributions, and
    I(x0; u_T) = 1/2 log det(Sigma_T + c c^T) / det(Sigma_T)."""
    sde = other_examples["cld"].build(dict(beta=0.5))
    rows = {r.name: r for r in verify.coupled_prior_gap(sde, FAST)}
    Phi, Sigma = (q[0] for q in sde.kernel(torch.tensor([1.0], dtype=torch.float64)))
    c = Phi[:, 0]
    p_T = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), Sigma + torch.outer(c, c))
    prior = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), Sigma)
    assert rows["KL(p_T || prior)"].measured == pytest.approx(float(torch.distributions.kl_divergence(p_T, prior)),
                                                              rel=1e-9)
    information = 0.5 * float(torch.logdet(Sigma + torch.outer(c, c)) - torch.logdet(Sigma))
    assert rows["I(x0; u_T)"].measured == pytest.approx(information, rel=1e-9)
    assert rows["KL(p_T || prior)"].status == rows["I(x0; u_T)"].status == verify.WARN
    assert "raise T" in rows["I(x0; u_T)"].note
    assert rows["prior: logp vs sampling"].status == verify.OK


def test_coupled_prior_checks_catch_a_wrong_sampler_and_an_unnormalised_logp(other_examples):
    cld = other_examples["cld"]

    def prior_sampling(self, shape, generator=None):   # v's spread 20 % too wide
        x, v = self.split(original(self, "prior_sampling")(shape, generator))
        return self.join([x, 1.2 * v])

    rows = statuses(verify.coupled_prior_gap(broken(cld, prior_sampling=prior_sampling), FAST))
    assert rows["prior: logp vs sampling"] == verify.FAIL

    def prior_logp(self, u):
        return original(self, "prior_logp")(u) + 0.1

    rows = statuses(verify.coupled_prior_gap(broken(cld, prior_logp=prior_logp), FAST))
    assert rows == {"prior: logp vs sampling": verify.FAIL, "KL(p_T || prior)": verify.NA, "I(x0; u_T)": verify.NA}


def test_tabulated_density_integrates_exactly_on_its_cells(other_examples):
    """q(t) t is constant on each cell of the table, so Gauss-Legendre on the cells is exact: the golden module
    reaches 1e-15; a density 0.1 % too large fails."""
    row = verify.time_sampler(other_examples["cld"].build(), FAST)[0]
    assert row.status == verify.OK and row.measured < 1e-12 and "4096 cells of the table" in row.note

    def t_density(self, t):
        return 1.001 * original(self, "t_density")(t)

    assert verify.time_sampler(broken(other_examples["cld"], t_density=t_density), FAST)[0].status == verify.FAIL


def test_tabulated_form_catches_a_table_normalised_by_the_trapezoid_rule(other_examples):
    """The density is w / Z with Z from the table (Simpson's rule in log t). Normalised by the trapezoid rule
    instead, Z is off by ~h^2 (w t)'' / 12 relative (h the table's spacing in log t): q stays proportional to the
    weight and sample_t and its inverse agree, but the form row (Simpson's Z, its Richardson error estimate
    ~1e-13 here) and the density's integral fail; the module's own table passes within its estimate."""
    def _build(self, device):
        original(self, "_build")(device)
        mass = self._weight64(self._log_t.exp()) * self._log_t.exp()
        self._mass_total = ((mass[1:] + mass[:-1]) / 2 * self._log_t.diff()).sum()

    sde = broken(other_examples["cld"], _build=_build)
    rows = statuses(verify.time_sampler(sde, FAST))
    assert rows == {"t_density integrates to t_cdf": verify.FAIL, "t_density form (importance)": verify.FAIL,
                    "t_icdf inverts t_cdf": verify.OK, "sample_t vs t_cdf (KS)": verify.OK}
    golden = verify.time_sampler(other_examples["cld"].build(), FAST)[1]
    assert golden.status == verify.OK and golden.measured < golden.tolerance < 1e-8


def test_float32_check_catches_a_kernel_evaluated_in_the_modules_dtype(other_examples):
    """A CLD closed form with r left in t's dtype (the module works in float64 first): right in float64 (the
    moment ODEs hold), but Q_xx = (expm1(2a) - 2a - 2a^2) e^-2a ~ 4a^3 / 3 cancels, and in float32
    near eps (a ~ 1e-4) it keeps no digit."""
    def kernel(self, t):
        Phi, Q = self.transition(self.time_change(t))
        return Phi, Phi @ self.Sigma0 @ Phi.transpose(1, 2) + Q

    def transition(self, r):
        a = math.sqrt(self.M_inv) * self.beta * r
        decay, decay2, br = torch.exp(-a), torch.exp(-2 * a), self.beta * r
        Phi = torch.stack([torch.stack([decay * (1 + a), self.M_inv * br * decay], -1),
                           torch.stack([-br * decay, decay * (1 - a)], -1)], -2)
        Q01 = 2 * math.sqrt(self.M_inv) * br**2 * decay2
        Q = torch.stack([torch.stack([decay2 * (torch.expm1(2 * a) - 2 * a - 2 * self.M_inv * br**2), Q01], -1),
                         torch.stack([Q01, 1 / self.M_inv + decay2 * (2 * self.M_inv * br - math.sqrt(self.M_inv)
                                                                      - 2 * self.M_inv**1.5 * br**2)
                                      / self.M_inv**1.5], -1)], -2)
        return Phi.double(), Q.double()

    sde = broken(other_examples["cld"], kernel=kernel, transition=transition)
    assert set(statuses(verify.coupled_moment_odes(sde, FAST)).values()) == {verify.OK}
    # In float64 the same cancellation costs ~1e-8 of Q_xx near eps: against the module's own weight (from the
    # series, which keeps every digit) that shows, but it is five orders below what float32 loses.
    methods = verify.coupled_kernel_methods(sde, FAST)[0]
    assert methods.measured < 1e-7, verify.format_table([methods])
    row = verify.float32_precision(sde, FAST)[0]
    assert row.status == verify.FAIL and row.measured > 1e-2


def test_hybrid_score_catches_a_marginal_instead_of_a_conditional_score(other_examples):
    """s_v = -eps_v / sqrt(Sigma_vv): the score of v's marginal, not of v given x. Near t = 0 Sigma_vv ~ gamma M
    is far above the conditional variance, so both rows fail."""
    def noise_to_score(self, eps, t):
        Sigma = self.kernel(t)[1]
        x, v = self.split(eps)
        return self.join([torch.zeros_like(x), -v / self._expand(Sigma[:, 1, 1].sqrt().to(eps.dtype), v)])

    rows = statuses(verify.hybrid_score(broken(other_examples["cld"], noise_to_score=noise_to_score), FAST))
    assert rows == {"noise_to_score = kernel score": verify.FAIL, "E[g^2 noise_to_score^2] = weight": verify.FAIL}


def test_hybrid_score_catches_a_score_on_the_noiseless_component(other_examples):
    """A score for x as well: harmless to the weighted loss (g_x = 0), but the reverse SDE must see 0 there."""
    def noise_to_score(self, eps, t):
        x, v = self.split(original(self, "noise_to_score")(eps, t))
        return self.join([x - self.split(eps)[0], v])

    rows = statuses(verify.hybrid_score(broken(other_examples["cld"], noise_to_score=noise_to_score), FAST))
    assert rows == {"noise_to_score = kernel score": verify.FAIL, "E[g^2 noise_to_score^2] = weight": verify.OK}


def test_hybrid_score_identity_catches_a_weight_ten_percent_high(other_examples):
    """weight() and its table 10 % high together (t_density is unchanged: the table is normalised). With the
    default 32768 draws 5 standard errors are 3.9 % of w (one noisy component: g^2 s^2 = w chi^2_1)."""
    def _weight64(self, t):
        return 1.1 * original(self, "_weight64")(t)

    rows = statuses(verify.hybrid_score(broken(other_examples["cld"], _weight64=_weight64), verify.Settings()))
    assert rows == {"noise_to_score = kernel score": verify.OK, "E[g^2 noise_to_score^2] = weight": verify.FAIL}


def test_score_matching_weighting_has_no_weight_identity(other_examples):
    def _weight64(self, t):
        return torch.ones_like(t, dtype=torch.float64)

    sde = broken(other_examples["cld"], weighting="score_matching", _weight64=_weight64)
    rows = {r.name: r for r in verify.hybrid_score(sde, FAST)}
    assert rows["E[g^2 noise_to_score^2] = weight"].status == verify.NA
    assert rows["noise_to_score = kernel score"].status == verify.OK
    assert statuses(verify.coupled_kernel_methods(sde, FAST)) == {"kernel methods agree": verify.OK}


# -- Report and command line --------------------------------------------------------------------------

def test_table_and_json(examples):
    rows = [verify.CheckResult("a", verify.OK, 1e-3, 1e-2, "fine"),
            verify.CheckResult("b", verify.FAIL, math.inf, 1e-4, "float32 inf"),
            verify.CheckResult("c", verify.NA, note="why")]
    text = verify.format_table(rows)
    assert text.splitlines()[0].split() == ["check", "result", "measured", "tolerance", "note"]
    assert "0.001" in text and "inf" in text and text.endswith("FAILED: 1 ok, 1 n/a, 1 FAIL")
    data = json.loads(verify.to_json(rows))
    assert data["ok"] is False
    assert data["checks"][1] == {"name": "b", "status": "FAIL", "measured": "inf", "tolerance": 1e-4,
                                 "note": "float32 inf"}
    assert data["checks"][2]["measured"] is None


def test_cli_check_prints_the_table(capsys):
    assert main(["check", str(ROOT / "examples" / "vp.sde"), "--paths", "2048", "--steps", "200"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["check", "result", "measured"]
    assert out.rstrip().endswith("passed: 17 ok")


def test_cli_check_a_coupled_sde(other_examples, monkeypatch, capsys):
    """The golden module stands in for compiling cld.sde (4 s of SymPy; the slow CLI test compiles it)."""
    monkeypatch.setattr(verify, "build", lambda path, params: other_examples["cld"].build())
    assert main(["check", str(ROOT / "examples" / "cld.sde"), "--paths", "2048", "--steps", "200", "--json"]) == 0
    rows = {row["name"]: row["status"] for row in json.loads(capsys.readouterr().out)["checks"]}
    assert rows == dict.fromkeys(COUPLED_ROWS, "ok")


def test_cli_check_json_and_warnings(capsys):
    code = main(["check", str(ROOT / "examples" / "vp.sde"), "--param", "beta_max=2", "--json",
                 "--paths", "2048", "--steps", "200", "--data-std", "0.5"])
    assert code == 0   # warnings do not fail
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True
    rows = {row["name"]: row for row in data["checks"]}
    assert rows["KL(p_T || prior)"]["status"] == "warn" and rows["I(x0; x_T)"]["status"] == "warn"
    assert set(rows["m' = a m"]) == {"name", "status", "measured", "tolerance", "note"}


def test_cli_check_exits_1_when_a_check_fails(examples, monkeypatch, capsys):
    def marginal_prob(self, x0, t):
        mean, std = original(self, "marginal_prob")(x0, t)
        return mean, 1.01 * std

    monkeypatch.setattr(verify, "build", lambda path, params: broken(examples["vp"], marginal_prob=marginal_prob))
    assert main(["check", str(ROOT / "examples" / "vp.sde"), "--paths", "1024", "--steps", "100"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED:" in out


@pytest.mark.parametrize("argv, message", [
    (["--param", "beta_maxx=2"], "unknown parameter 'beta_maxx'"),
    (["--param", "beta_max=-2"], "beta_max must be positive"),
    (["--paths", "10"], "paths must be at least 100"),
])
def test_cli_check_bad_input_exits_2(argv, message, capsys):
    assert main(["check", str(ROOT / "examples" / "vp.sde"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_check_missing_file_exits_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.sde")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_check_does_not_import_torch_until_it_runs():
    code = ("import sdelang.cli, sys; sdelang.cli.build_parser().parse_args(['check', 'x.sde']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- Slow: defaults, several seeds, every example file --------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_no_false_failures_across_seeds(all_examples, seed):
    """With the default sizes and 4 seeds, 8 affine examples x 14 rows and 2 coupled ones x 15 rows: no FAIL
    (each Monte Carlo row fails a correct module with probability ~1e-5, the KS row with 1e-3)."""
    for name in ALL + COUPLED:
        rows = verify.run_checks(all_examples[name].build(), seed=seed)
        assert verify.passed(rows), f"{name}, seed {seed}:\n{verify.format_table(rows)}"


@pytest.mark.slow
def test_default_simulation_catches_a_five_percent_std(examples):
    def marginal_prob(self, x0, t):
        mean, std = original(self, "marginal_prob")(x0, t)
        return mean, 1.05 * std

    for name in ALL:
        rows = statuses(verify.forward_simulation(broken(examples[name], marginal_prob=marginal_prob),
                                                  verify.Settings()))
        assert rows["forward EM: variance"] == verify.FAIL, name


@pytest.mark.slow
@pytest.mark.parametrize("name", COUPLED)
def test_default_coupled_simulation_catches_a_ten_percent_covariance(other_examples, name):
    """Sigma 10 % too large (a 5 % std): at the defaults a covariance entry's 5 SE are ~4 % of it."""
    def marginal_prob(self, x0, t):
        mean, Sigma = original(self, "marginal_prob")(x0, t)
        return mean, 1.1 * Sigma

    rows = statuses(verify.coupled_forward_simulation(broken(other_examples[name], marginal_prob=marginal_prob),
                                                      verify.Settings()))
    assert rows == {"forward EM: mean": verify.OK, "forward EM: covariance": verify.FAIL}


# Coupled SDEs the golden files do not cover: a time profile beta(t) with a nonzero initial mean, score-matching
# weighting and uniform t; three components with two noises and the data first; a profile 1 / sqrt(t) that is
# infinite at t = 0 (the simulation starts at eps from perturb()).
COUPLED_VARIANTS = {
    "profile": """sde profile
M = 0.25
dx = (0.5 + 6 * t) / M * v dt
dv = (0.5 + 6 * t) * (-x - 2 * sqrt(M) / M * v) dt + sqrt((0.5 + 6 * t) * 4 * sqrt(M)) dw
v(0) ~ normal(0.5, 0.01)
t in [1e-3, 1]
weighting score_matching
t ~ uniform
""",
    "three": """sde three
dx = 2 * v dt
dv = (-2 * x - v + a) dt + sqrt(2) dw
da = (-v - 3 * a) dt + 1 dw
v(0) ~ normal(0, 0.1)
a(0) ~ normal(1, 0.2)
t in [1e-3, 4]
t ~ importance
""",
    "root_clock": """sde root_clock
dx = 4 / sqrt(t) * v dt
dv = (-x - 4 * v) / sqrt(t) dt + sqrt(8 / sqrt(t)) dw
v(0) ~ normal(0, 0.01)
t in [1e-3, 1]
t ~ importance
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COUPLED_VARIANTS))
def test_compiled_coupled_variants_pass_every_check(tmp_path, name):
    path = tmp_path / f"{name}.sde"
    path.write_text(COUPLED_VARIANTS[name])
    rows = verify.run_checks(sdelang.load(path), paths=8192)
    expected_na = {"E[g^2 noise_to_score^2] = weight"} if name == "profile" else set()
    assert {r.name for r in rows if r.status == verify.NA} == expected_na
    assert verify.passed(rows) and not [r for r in rows if r.status == verify.WARN], verify.format_table(rows)
    if name == "root_clock":
        assert "from t = 0.001" in rows[0].note


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.sde")), ids=lambda p: p.stem)
def test_every_example_file_passes_the_cli(path, capsys):
    assert main(["check", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and all(row["status"] in ("ok", "n/a") for row in data["checks"]), data


THIRD_ORDER_CHAIN = """\
sde chain3
param L = 3
param xi = 4
dx = L * v dt
dv = (-L * x + L * a) dt
da = (-L * v - xi * a) dt + sqrt(2 * xi) dw
v(0) ~ normal(0, 0.05)
a(0) ~ normal(0, 0.02)
t in [1e-5, 1]
weighting likelihood
t ~ importance
"""


def test_coupled_checks_allow_for_their_own_rounding_near_eps():
    """A third-order chain near eps: Sigma's correlation matrix has cond ~ 1e13 at t = 1e-5, and a float64 inverse of
    it is 3e-3 off however right the module is (its weight agrees with 60-digit arithmetic to 2e-16), so the checks
    bound their own reference's rounding. A weight 1e-6 high still fails where the reference holds its digits."""
    module = sdelang.load(THIRD_ORDER_CHAIN).double()
    assert statuses(verify.coupled_kernel_methods(module, FAST)) == {"kernel methods agree": verify.OK}
    assert statuses(verify.hybrid_score(module, FAST))["noise_to_score = kernel score"] == verify.OK

    def _weight64(self, t):
        return original(self, "_weight64")(t) * (1 + 1e-6)

    cls = type("BrokenChain", (type(module),), {"_weight64": _weight64})
    assert statuses(verify.coupled_kernel_methods(cls().double(), FAST)) == {"kernel methods agree": verify.FAIL}


def test_diverging_paths_fail_the_prior_gap():
    """dx = x^3 dt + dw blows up before T = 1 for most paths from N(0, 1): the simulated KL(p_T || prior) is FAIL
    with the count, where NaN once compared false against the warning level and passed as ok."""
    sde = sdelang.load("sde unstable\ndx = x^3 dt + 1 dw\nprior normal(0, 1)\n").double()
    (row,) = [r for r in verify.prior_gap_simulated(sde, FAST) if r.name == "KL(p_T || prior)"]
    assert row.status == verify.FAIL and "Euler-Maruyama paths" in row.note and "not finite" in row.note


def test_a_fast_process_far_from_its_defaults_passes():
    """OU pulled to its mean at 100 times the default rate, on [1e-5, 5]: m falls to e^-500 beside c = 0.5. The
    checks read m from marginal_prob as (m X + c) - c, which at X = 1 was 0 from t = 0.33 (m' = a m FAILED, and
    log m^2 / v was -inf against a correct logSNR), and float32 cannot hold m below 1.2e-38 at all (relative error
    1, FAILED): a correct module failed three checks. X = 2^1000, and float32 errors against max(|value|, its
    smallest normal number)."""
    sde = sdelang.load(ROOT / "examples" / "ou.sde", theta=100.0)
    rows = verify.run_checks(sde, paths=FAST.paths, steps=FAST.steps)
    assert verify.passed(rows) and not [r for r in rows if r.status == verify.FAIL], verify.format_table(rows)


def test_step_methods_where_m_underflows(examples):
    """VP at beta_max = 1e4: m(t) = e^(-B/2) underflows float64 past t = 0.55 (m(1) = e^-2500), so m(t) / m(s) is
    0 / 0, while the module's step is right (r = e^-(B(t) - B(s))/2). The row takes r from logSNR there and passes;
    it reported NaN before."""
    rows = statuses(verify.step_methods(examples["vp"].build({"beta_max": 1e4}), FAST))
    assert rows == {"discretize vs kernel": verify.OK, "drift_divergence = d a(t)": verify.OK,
                    "reverse: f - g^2 s": verify.OK}
