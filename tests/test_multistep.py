"""The multistep exponential integrators (sampling/dpmpp.py) and the time grids (sampling/grids.py),
against closed forms with exact scores.

Gaussian data N(mu, s^2 I) has a known flow map (see test_sampling.exact_flow), so the solvers' orders of
convergence are measured without Monte Carlo; data at one point makes the data prediction constant along
the flow, and every order is then exact on any grid.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from sdelang.runtime import sampling
from sdelang.runtime.sampling import dpmpp, grids
from test_sampling import F64, build, exact_flow, gaussian, point_score, start

# Every affine example: ou has c(t) != 0, edm_ve is an EDM-style VE (sigma from 0.002 to 80).
SDES = ["ve", "vp", "subvp", "ou", "cosine_vp", "edm_ve"]
NEW = ["dpmpp_2m", "dpmpp_3m", "dpmpp_3m_published", "unipc", "unipc_3m", "deis", "lms", "dpmpp_2m_sde",
       "dpmpp_3m_sde"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flow_error(sde, method, steps, **options):
    data = gaussian(sde)
    x_T, _ = start(data, 64, seed=0)
    out = sampling.sample(sde, data.score, x_T.shape, method, steps, x_T=x_T, denoise=False, **options)
    return (out.x - exact_flow(data, x_T)).pow(2).mean().sqrt().item()


# (method, options, order, one-sided): log2(e(40) / e(80)) on a logSNR grid. Measured over SDES: 2M
# 2.03 (exact form, lambda), 2.05-2.08 (sigma), 1.90-1.98 (published form, the default; 1.97 from 40 to 80
# on all but subvp); 3M 3.06-3.08 (sigma); unipc 2.97-3.01 (lambda); deis (noise prediction, 3M and the
# corrector: order 4) 4.02-4.13; unipc_3m (3M and the corrector in data prediction: order 4) at 320 -> 640
# steps, see below. 3M in lambda measured 4.02-4.09 on this data: the h^3 term of its error
# cancels for Gaussian data, so only "at least 3" is asserted for it. The published 3M and lms: below.
ORDERS = [("dpmpp_2m", dict(variable="lambda", form="exact"), 2, False),
          ("dpmpp_2m", dict(variable="sigma", form="exact"), 2, False),
          ("dpmpp_2m", dict(), 2, False),
          ("dpmpp_3m", dict(variable="sigma"), 3, False),
          ("dpmpp_3m", dict(variable="lambda"), 3, True),
          ("unipc", dict(variable="lambda"), 3, False),
          ("deis", dict(), 4, False)]


@pytest.mark.parametrize("name", SDES)
def test_unipc_3m_is_of_fourth_order(examples, name):
    """unipc_3m reaches its order late on this data: its error is A h^4 + B h^5 with B of the opposite
    sign and comparable size at h ~ 0.5, so log2(e(N) / e(2N)) rises towards 4 as the steps shrink. At its
    defaults (floored grid and variable) measured 3.0-3.5 from 40 to 80 steps and 3.93-3.97 from 320 to 640
    (errors 7e-10 to 4e-8, far above float64 rounding); on the logSNR grid with the polynomial in lambda,
    its defaults before, 1.6-3.5 and 3.90-3.97."""
    sde = build(examples, name)
    coarse, fine = (flow_error(sde, "unipc_3m", k) for k in (320, 640))
    observed = math.log2(coarse / fine)
    assert abs(observed - 4) < 0.15, f"{name} unipc_3m: observed order {observed:.3f}, expected 4"


# At their defaults, 20 steps, error / s (measured on this draw; docs/runtime.md), ve, vp, subvp, ou, cosine_vp,
# edm_ve: unipc_3m 1.9e-4, 5.3e-4, 5.3e-4, 1.4e-4, 5.8e-4, 2.0e-4 (on the logSNR grid with the polynomial in
# lambda, its defaults before the floored grid, vp, subvp and cosine_vp were at 1.8e-3, 2.3e-2 and 2.2e-3);
# unipc 1.1e-3, 4.5e-3, 5.9e-3, 2.9e-3, 4.4e-3, 2.9e-3 (on the logSNR grid subvp was at 3.8e-2).
@pytest.mark.parametrize("method, bound", [("unipc_3m", 1e-3), ("unipc", 1e-2)])
@pytest.mark.parametrize("name", SDES)
def test_floored_grid_error_in_20_steps(examples, name, method, bound):
    """Below SIGMA_FLOOR the floored grid steps uniformly in sigma, in which the data prediction is smooth:
    no example spends its steps on decades of noise levels where x0_hat no longer changes."""
    error = flow_error(build(examples, name), method, 20) / 0.5
    assert error < bound, f"{name} {method} at 20 steps: error / s {error:.2e}"


@pytest.mark.parametrize("method, options, order, at_least", ORDERS)
@pytest.mark.parametrize("name", SDES)
def test_order_of_convergence(examples, name, method, options, order, at_least):
    sde = build(examples, name)
    coarse, fine = (flow_error(sde, method, k, spacing="logsnr", **options) for k in (40, 80))
    observed = math.log2(coarse / fine)
    if at_least:
        assert observed > order - 0.15, f"{name} {method}: observed order {observed:.3f}, expected >= {order}"
    else:
        assert abs(observed - order) < 0.15, f"{name} {method}: observed order {observed:.3f}, expected {order}"


# (method, coarse steps, order, tolerance): log2(e(N) / e(2N)) at the defaults but on the logSNR grid, on which
# doubling the steps halves every step in sigma as well. lms (Adams-Bashforth of order 4 in sigma) measured
# 3.74-3.85 from 160 to 320 steps (3.49-3.76 from 80 to 160, 3.79-3.92 from 320 to 640): its first steps
# run at orders 1, 2 and 3, whose local errors (h^2, h^3, h^4, with small constants where the flow is
# nearly linear in sigma, at T) pull the slope below 4 at the steps a test can afford, hence 0.3. The
# published 3M (k-diffusion's dpmpp_3m_sde at eta = 0) halves the exact curvature term and leaves an h^3
# local error: second order, measured 2.04-2.14 from 80 to 160 (2.12-2.41 from 40 to 80); 0.15 as above.
# An lms of order 3, or a 3M with the exact curvature term (order 3-4 here), fails these.
REGISTERED_ORDERS = [("lms", 160, 4, 0.3), ("dpmpp_3m_published", 80, 2, 0.15)]


@pytest.mark.parametrize("method, steps, order, tolerance", REGISTERED_ORDERS)
@pytest.mark.parametrize("name", SDES)
def test_order_of_lms_and_published_3m(examples, name, method, steps, order, tolerance):
    sde = build(examples, name)
    coarse, fine = (flow_error(sde, method, k, spacing="logsnr") for k in (steps, 2 * steps))
    observed = math.log2(coarse / fine)
    assert abs(observed - order) < tolerance, f"{name} {method}: observed order {observed:.3f}, expected {order}"


def test_adams_bashforth_weights_on_uniform_steps():
    """With nodes equally spaced in sigma (w = sigma / sigma_t - 1 = W, 2W, 3W, 4W for the step from W to 0)
    the lms weights are the classical Adams-Bashforth ones, -W (55, -59, 37, -9) / 24 at order 4,
    -W (23, -16, 5) / 12 at order 3 and -W (3, -1) / 2 at order 2, whatever the step (h = log(1 + W) in
    lambda: a short and a long one)."""
    classical = {2: np.array([3, -1]) / 2, 3: np.array([23, -16, 5]) / 12, 4: np.array([55, -59, 37, -9]) / 24}
    for h in (1e-2, 3.0):
        W = math.expm1(h)
        for order, expected in classical.items():
            nodes = [-math.log1p((j + 1) * W) for j in range(order)]
            np.testing.assert_allclose(dpmpp._weights(nodes, h, -1.0, "sigma"), -W * expected, rtol=1e-13)


@pytest.mark.parametrize("method", ["lms", "dpmpp_3m_published"])
@pytest.mark.parametrize("name", SDES)
def test_lms_and_published_3m_exact_for_a_point_mass(examples, name, method):
    """Data at x0 (see the test below), at their defaults (the floored grid), 7 steps: the flow map to
    1e-10 relative; ou has c(t) != 0, which the steps must carry exactly."""
    sde = build(examples, name)
    x0 = torch.tensor([[0.7, -1.3]], dtype=F64)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    T, e = (torch.full((32,), float(v), dtype=F64) for v in (sde.T, sde.eps))
    at = lambda t: sde.marginal_prob(x0.expand(32, 2), t)[0] + sde._expand(sde.std(t), z) * z  # noqa: E731
    out = sampling.sample(sde, point_score(sde, x0), (32, 2), method, 7, x_T=at(T), denoise=False)
    torch.testing.assert_close(out.x, at(e), rtol=1e-10, atol=1e-10 * at(e).abs().max().item())


@pytest.mark.parametrize("spacing", grids.SPACINGS)
@pytest.mark.parametrize("variable", dpmpp.VARIABLES)
@pytest.mark.parametrize("method", ["dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3m", "deis"])
@pytest.mark.parametrize("name", SDES)
def test_exact_for_a_point_mass(examples, name, method, variable, spacing):
    # dpmpp_2m runs in its default, published form: its weights too sum to the exact integral.
    """Data at x0: x0_hat = x0 and the noise prediction (x - m x0 - c) / sigma = z are constant along the
    flow, which every interpolating polynomial reproduces, and the linear part is integrated exactly: the
    flow map x_eps = m x0 + c + (sigma_eps / sigma_T)(x_T - m_T x0 - c_T) to float64 rounding (1e-10
    relative) after 7 steps of any grid, whatever the polynomial's variable (lambda, sigma, time). deis in
    noise prediction carries an error of x to its noise prediction divided by sigma, and its long steps
    multiply it: on subvp's logSNR grid (7 steps of h = 2.6 in lambda) a perturbation of x_T grows ~7x per step,
    5.5e-8 of max |x| at eps on an AVX-512 CPU (5e-9 on another; with 40-digit weights still 3.8e-8: the
    update's rounding, not the weights'). So deis is allowed the rounding of each step times the growth of an
    error made at that step, summed over the steps, the growth measured by the same sampler. The rounding is
    taken as 64 u max |x|: a step rounds x - m x0 in the score, the noise prediction and the update's eight
    products and sums (measured: 30-36 u on the three logSNR-grid cases of subvp that need it)."""
    sde = build(examples, name)
    x0 = torch.tensor([[0.7, -1.3]], dtype=F64)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    T, e = (torch.full((32,), float(v), dtype=F64) for v in (sde.T, sde.eps))
    at = lambda t: sde.marginal_prob(x0.expand(32, 2), t)[0] + sde._expand(sde.std(t), z) * z  # noqa: E731
    out = sampling.sample(sde, point_score(sde, x0), (32, 2), method, 7, x_T=at(T), denoise=False,
                          spacing=spacing, variable=variable)
    scale = at(e).abs().max().item()
    tolerance = 1e-10
    if method == "deis":
        tolerance = max(tolerance, 64 * torch.finfo(F64).eps * sum(growth_of_a_step_error(
            lambda **hook: sampling.sample(sde, point_score(sde, x0), (32, 2), method, 7, x_T=at(T), denoise=False,
                                           spacing=spacing, variable=variable, **hook).x, 7)))
    torch.testing.assert_close(out.x, at(e), rtol=tolerance, atol=tolerance * scale)




def growth_of_a_step_error(run, steps):
    """For each step, how much an error of x after it (relative to max |x|) moves the final x (relative to its
    max |x|): the sampler is linear in x for a point mass, so a perturbation of 1e-6 measures it."""
    base = run()
    growth = []
    for k in range(steps):
        counter = iter(range(steps))

        def nudge(x, t, k=k):
            moved = x + 1e-6 * x.abs().max() * torch.randn(x.shape, generator=torch.Generator().manual_seed(k),
                                                            dtype=x.dtype)
            return moved if next(counter) == k else x
        growth.append(((run(after_step=nudge) - base).abs().max() / (1e-6 * base.abs().max())).item())
    return growth

@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
@pytest.mark.parametrize("name", SDES)
def test_sde_variant_is_exact_for_a_point_mass(examples, name, method):
    """Data at x0: each stochastic step is the exact reverse-SDE transition, so from p_T(. | x0) the
    samples at eps are N(m x0 + c, v) after 6 steps: standardised mean and variance within 5 standard
    errors (n = 4000 x d = 2: 0.056 and 0.079)."""
    sde = build(examples, name)
    x0 = torch.tensor([[0.7, -1.3]], dtype=F64)
    n = 4000
    generator = torch.Generator().manual_seed(3)
    T, e = (torch.full((n,), float(v), dtype=F64) for v in (sde.T, sde.eps))
    mean_T, std_T = sde.marginal_prob(x0.expand(n, 2), T)
    x_T = mean_T + sde._expand(std_T, mean_T) * torch.randn(n, 2, generator=generator, dtype=F64)
    out = sampling.sample(sde, point_score(sde, x0), (n, 2), method, 6, x_T=x_T, denoise=False,
                          generator=generator)
    mean, std = sde.marginal_prob(x0.expand(n, 2), e)
    standard = ((out.x - mean) / sde._expand(std, mean)).flatten()
    assert abs(standard.mean().item()) < 5 / math.sqrt(standard.numel())
    assert abs(standard.var().item() - 1) < 5 * math.sqrt(2 / (standard.numel() - 1))


@pytest.mark.parametrize("variable", dpmpp.VARIABLES)
@pytest.mark.parametrize("a", [2.0, 1.0, -1.0])
def test_weights_integrate_the_interpolant(variable, a):
    """The step weights against scipy's quad of a e^{a u} times the Lagrange basis (a = 1 + eta for the
    data prediction, eta = 0 or 1; a = -1 for the noise prediction), for nodes as in a fourth-order step,
    long (h = 4) and short (h = 1e-3) steps. For "time" the variable is a made-up monotone t(u) =
    0.3 - 0.1 tanh(u / 3), standing for the inverse logSNR; for "floored" it is log(sigma + 1e-3) at
    lambda = 5 + u (sigma = e^{-lambda} from 6.7e-3 to 3e-4 over the nodes: both regimes)."""
    warps = {"time": lambda u: 0.3 - 0.1 * np.tanh(np.asarray(u) / 3),
             "floored": lambda u: np.log(np.exp(-(5 + np.asarray(u))) + 1e-3)}
    warp_at = warps.get(variable)
    warp = {"lambda": lambda u: u, "sigma": lambda u: math.exp(-u)}.get(variable) or (lambda u: float(warp_at(u)))
    for h in (4.0, 0.3, 1e-3):
        nodes = [-h, -1.7 * h, -2.9 * h, -3.6 * h]
        for j in range(4):
            def basis(u, j=j):
                return np.prod([(warp(u) - warp(nodes[i])) / (warp(nodes[j]) - warp(nodes[i]))
                                for i in range(4) if i != j])
            expected = quad(lambda u: a * math.exp(a * u) * basis(u), -h, 0, epsabs=0, epsrel=1e-13)[0]
            got = dpmpp._weights(nodes, h, a, variable, warp_at)[j]
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-14), (h, j)


def test_published_3m_weights():
    """DPM-Solver++(3M)'s weights: they sum to the exact integral of a constant, 1 - e^{-h}; they integrate
    a line through the nodes exactly (its curvature term vanishes); on a quadratic they give the exact
    integral minus half the curvature term, i.e. minus phi_3 d2 for tau^2 = ((lambda - lambda_s) / h)^2."""
    h = 0.7
    nodes = [-h, -1.2 * h, -2.9 * h]
    w, exact = dpmpp._published_3m(nodes, h, 1.0), dpmpp._weights(nodes, h, 1.0, "lambda")
    line = np.array([1 + 2 * n for n in nodes])
    assert w.sum() == pytest.approx(-math.expm1(-h), rel=1e-13)
    assert w @ line == pytest.approx(exact @ line, rel=1e-12)
    tau2 = np.array([((n + h) / h) ** 2 for n in nodes])
    phi_3 = (1 + math.expm1(-h) / h) / h - 0.5
    assert w @ tau2 == pytest.approx(exact @ tau2 + phi_3, rel=1e-12)


@pytest.mark.parametrize("spacing", grids.SPACINGS)
@pytest.mark.parametrize("name", SDES)
def test_grids_run_from_T_to_eps(examples, name, spacing):
    """Every grid starts at T, ends at eps, decreases strictly; logsnr is uniform in logSNR, edm uniform
    in exp(-logSNR / (2 rho)) and floored in log(exp(-logSNR / 2) + 1e-3) (to the bisection's float64
    resolution, 1e-9 relative)."""
    sde = build(examples, name)
    grid = grids.time_grid(sde, 12, spacing, "cpu")
    assert grid[0].item() == float(sde.T) and grid[-1].item() == float(sde.eps)
    assert bool((grid[1:] < grid[:-1]).all())
    if spacing == "time":
        return
    log_snr = sde.log_snr(grid)
    values = {"logsnr": log_snr, "edm": torch.exp(-log_snr / (2 * grids.RHO)),
              "floored": torch.log(torch.exp(-log_snr / 2) + 1e-3)}[spacing]
    steps = values[1:] - values[:-1]
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-9, atol=0)


def test_default_grids(examples):
    """Each multistep sampler's default grid (chosen by measurement, docs/runtime.md) is what it walks when
    no spacing is given."""
    floored = dict.fromkeys(["unipc", "unipc_3m", "lms", "dpmpp_3m_published"], "floored")
    assert {m: sampling.default_spacing(m) for m in NEW} == dict.fromkeys(NEW, "logsnr") | {"deis": "edm"} | floored
    sde = build(examples, "vp")
    data = gaussian(sde)
    x_T, _ = start(data, 8, seed=0)
    plain, edm = (sampling.sample(sde, data.score, x_T.shape, "deis", 9, x_T=x_T, denoise=False, **options).x
                  for options in ({}, {"spacing": "edm"}))
    assert torch.equal(plain, edm)


K = 7


@pytest.mark.parametrize("method", NEW)
def test_nfe_is_one_per_step(examples, method):
    sde = build(examples, "ou")
    data = gaussian(sde)
    for denoise in (False, True):
        out = sampling.sample(sde, data.score, (8, 2), method, K, denoise=denoise,
                              generator=torch.Generator().manual_seed(0))
        assert out.nfe == K + denoise


def test_multistep_refuses_bad_options(examples):
    sde = build(examples, "vp")
    data = gaussian(sde)
    with pytest.raises(ValueError, match="order must be 1, 2, 3 or 4"):
        dpmpp.multistep(sde, data.score, (4, 2), 5, order=5)
    with pytest.raises(ValueError, match="noise prediction is for the flow ODE"):
        dpmpp.multistep(sde, data.score, (4, 2), 5, prediction="noise", eta=1.0)
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        dpmpp.multistep(sde, data.score, (4, 2), 5, prediction="score")
    with pytest.raises(ValueError, match="corrector is for the flow ODE"):
        dpmpp.multistep(sde, data.score, (4, 2), 5, corrector=True, eta=1.0)
    with pytest.raises(ValueError, match="unknown form 'taylor'"):
        dpmpp.multistep(sde, data.score, (4, 2), 5, form="taylor")
    with pytest.raises(ValueError, match="unknown variable 'logsnr'"):
        dpmpp.multistep(sde, data.score, (4, 2), 5, variable="logsnr")
    with pytest.raises(ValueError, match="unknown spacing 'log'"):
        sampling.sample(sde, data.score, (4, 2), "dpmpp_2m", 5, spacing="log")
