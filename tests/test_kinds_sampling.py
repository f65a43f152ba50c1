"""Sampling and likelihood for the coupled and general kinds of SDE module, against exact scores.

Coupled (generated/cld.py, CLD): for data x0 ~ N(mu, s^2) per entry and auxiliary components drawn from
their initial law N(mean0, Sigma0), the state u_t is Gaussian per data entry c,
    u_t ~ N(Phi(t) (mu_c e_x + a0), Sigma(t) + s^2 Phi e_x e_x^T Phi^T),   (Phi, Sigma) = sde.kernel(t),
a0 = the auxiliary initial means (CoupledGaussian). So its score and log p_t are known, and the flow
map, the reverse SDE's moments and its response to the data mean solve linear ODEs, integrated here
with scipy at tight tolerances as independent references.
General (generated/cubic_langevin.py): N(0, 1) is stationary, so data N(0, 1) keep p_t = N(0, 1), score
-x, at every t; and SINH_OU, compiled here, is x = sinh(y) for an OU process y (closed-form marginals).
Statistical checks use fixed seeds and 5 standard errors, plus measured discretisation allowances.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.integrate
import torch

import sdelang
from sdelang.runtime import sampling
from sdelang.runtime.evaluate import nll
from sdelang.runtime.likelihood import bound, log_likelihood

F64 = torch.float64
MU, S = (1.0, -0.5), 0.5   # coupled tests: data N(MU_c, S^2) in C = 2 entries
KERNEL_SAMPLERS = ("reverse_diffusion", "ancestral", "ald", "ddim", "dpm2")


@pytest.fixture(scope="module")
def cld(other_examples):
    return other_examples["cld"].build()


@pytest.fixture(scope="module")
def cubic(other_examples):
    return other_examples["cubic_langevin"].build()


# A coupled SDE with what CLD lacks: a time profile phi(t) = 4 beta(t) != 1, so the half steps of a step
# differ in r, and a prior mean mu_T != 0 (v starts at mean 1), so the Gaussian steps have an offset.
SCHEDULE = """sde coupled_schedule

beta(t) = 1/2 + t

dx = 4 * beta(t) * v dt
dv = (-beta(t) * x - 4 * beta(t) * v) dt + 2 * sqrt(beta(t)) dw
v(0) ~ normal(1, 1/100)

t in [1e-5, 1]
steps 1000
weighting likelihood
"""


@pytest.fixture(scope="module")
def coupled(other_examples):
    """The coupled SDEs by name: cld and SCHEDULE (compiled once)."""
    return {"cld": other_examples["cld"].build(), "schedule": sdelang.load(SCHEDULE).double()}


def full(value, n, dtype=F64):
    return torch.full((n,), float(value), dtype=dtype)


def assert_standard_normal(w: torch.Tensor, what: str, mean_allowance=0.0, var_allowance=0.0):
    """Each column of w [n, k] has mean 0 and variance 1 within 5 standard errors (1 / sqrt(n) and
    sqrt(2 / (n - 1))) plus an allowance for a sampler's discretisation bias."""
    n = w.shape[0]
    mean_err, var_err = w.mean(0).abs().max().item(), (w.var(0) - 1).abs().max().item()
    mean_tol, var_tol = 5 / math.sqrt(n) + mean_allowance, 5 * math.sqrt(2 / (n - 1)) + var_allowance
    assert mean_err <= mean_tol, f"{what}: mean off by {mean_err:.4f} (allowed {mean_tol:.4f})"
    assert var_err <= var_tol, f"{what}: variance off by {100 * var_err:.2f}% (allowed {100 * var_tol:.2f}%)"


# --- coupled: the exact marginals of Gaussian data --------------------------------------------------------

def components(sde, u):
    """u [B, K C] -> [B, K, C] in float64."""
    return torch.stack(sde.split(u), 1).to(F64)


class CoupledGaussian:
    """Data N(mu_c, s^2) in each entry c through a coupled SDE: the Gaussian marginals of the state u_t."""

    def __init__(self, sde, mu=MU, s=S):
        self.sde, self.mu, self.s = sde, torch.tensor(mu, dtype=F64), s
        self.a0 = sde.mean0.clone()
        self.a0[sde.data_index] = 0.0

    def moments(self, t):
        """Mean [B, K, C] and covariance [B, K, K] of u_t (per entry), float64."""
        Phi, Sigma = self.sde.kernel(t.to(F64))
        column = Phi[:, :, self.sde.data_index]
        mean = column[:, :, None] * self.mu.to(Phi) + (Phi @ self.a0)[:, :, None]
        return mean, Sigma + self.s**2 * column[:, :, None] * column[:, None, :]

    def score(self, u, t):
        """-cov^-1 (u - mean) at every component (the reverse SDE uses only the noisy ones)."""
        times, index = torch.unique(t.to(F64), return_inverse=True)
        mean, cov = self.moments(times)
        y = torch.linalg.inv(cov)[index] @ (components(self.sde, u) - mean[index])
        return self.sde.join((-y).to(u.dtype).unbind(1))

    def log_prob(self, u, t):
        """log p_t(u), summed over the entries, [B]."""
        mean, cov = self.moments(t)
        y = components(self.sde, u) - mean
        L = torch.linalg.cholesky(cov)
        w = torch.linalg.solve_triangular(L, y, upper=False)
        entries = y.shape[2]
        log_det = 2 * L.diagonal(dim1=1, dim2=2).log().sum(1)
        return -0.5 * (w**2).sum((1, 2)) - 0.5 * entries * (y.shape[1] * math.log(2 * math.pi) + log_det)

    def sample(self, n, t, generator, dtype=F64):
        """n exact draws of u_t."""
        mean, cov = self.moments(full(t, 1))
        z = torch.randn(n, mean.shape[1], len(self.mu), generator=generator, dtype=F64)
        return self.sde.join((torch.linalg.cholesky(cov[0]) @ z + mean[0]).to(dtype).unbind(1))

    def conditional(self, x, t):
        """Mean and variance of the auxiliary component (K = 2) given the data component x [B, C] at t."""
        mean, cov = self.moments(full(t, 1))
        i, j = self.sde.data_index, 1 - self.sde.data_index
        slope = cov[0, j, i] / cov[0, i, i]
        return mean[0, j] + slope * (x.to(F64) - mean[0, i]), cov[0, j, j] - slope * cov[0, j, i]


def hybrid(sde, score):
    """The score at the noisy components only, 0 at the others, as a model trained by hybrid score
    matching gives it (sde.noise_to_score)."""
    def masked(u, t):
        return sde.join([part if noisy else torch.zeros_like(part)
                         for part, noisy in zip(sde.split(score(u, t)), sde.noisy)])
    return masked


def matrices(sde, t):
    """F(t) = phi(t) F0, D(t) = phi(t) D0 as numpy arrays."""
    phi = float(sde.profile(full(t, 1))[0])
    return phi * sde.F0.numpy(), phi * sde.D0.numpy()


def solve_linear(rhs, y0, t0, t1, times=None):
    """scipy's DOP853 from t0 to t1 at rtol 1e-11, the independent reference for the maps below: the
    solution at t1, or at each of `times` if given ([len(y0), len(times)])."""
    solution = scipy.integrate.solve_ivp(rhs, (t0, t1), y0, method="DOP853", rtol=1e-11, atol=1e-13,
                                         t_eval=times)
    assert solution.success, solution.message
    return solution.y if times is not None else solution.y[:, -1]


def flow_map(data: CoupledGaussian, t0, t1):
    """The flow ODE du/dt = F u + D Sigma_t^-1 (u - m_t) / 2 (exact score) from t0 to t1, per entry:
    u(t1) = Psi u(t0) + psi[:, c]. Returns Psi [K, K] and psi [K, C]."""
    K, C = data.sde.F0.shape[0], len(data.mu)

    def rhs(t, y):
        F, D = matrices(data.sde, t)
        mean, cov = (v[0].numpy() for v in data.moments(full(t, 1)))
        A = F + 0.5 * D @ np.linalg.inv(cov)
        Psi, psi = y[:K * K].reshape(K, K), y[K * K:].reshape(K, C)
        return np.concatenate([(A @ Psi).ravel(), (A @ psi + (F - A) @ mean).ravel()])
    y = solve_linear(rhs, np.concatenate([np.eye(K).ravel(), np.zeros(K * C)]), t0, t1)
    return y[:K * K].reshape(K, K), y[K * K:].reshape(K, C)


def prior_score(sde):
    """s_G(u) = -Sigma_T^-1 (u - mu_T), the prior's score, which the splitting sampler's Gaussian steps use."""
    precision = torch.cholesky_inverse(sde._prior_chol)

    def score(u, t):
        y = components(sde, u) - sde._prior_mean[:, None]
        return sde.join((-(precision @ y)).to(u.dtype).unbind(1))
    return score


def linear_reverse_moments(sde, u_T, times):
    """Mean [K] and covariance [K, K] at each of `times` (descending from T) of the reverse SDE with the
    prior's score started at the point u_T: in tau = T - t, du = [-(F + D P) u + D P mu_T] dtau + G dW, so
    dm/dtau = -(F + D P) m + D P mu_T and dV/dtau = -(F + D P) V - V (F + D P)^T + D."""
    K = sde.F0.shape[0]
    P = torch.cholesky_inverse(sde._prior_chol).numpy()
    mu_T = sde._prior_mean.numpy()
    T = float(sde.T)

    def rhs(tau, y):
        F, D = matrices(sde, T - tau)
        B = -(F + D @ P)
        V = y[K:].reshape(K, K)
        return np.concatenate([B @ y[:K] + D @ P @ mu_T, (B @ V + V @ B.T + D).ravel()])
    taus = [T - t for t in times]
    y = solve_linear(rhs, np.concatenate([np.asarray(u_T, dtype=float), np.zeros(K * K)]), 0.0, taus[-1], taus)
    return [(y[:K, i], y[K:, i].reshape(K, K)) for i in range(len(times))]


def sample_x(sde, data, method, n, seed, **options):
    """sample() from exact draws of p_T: data samples [n, C] and NFE."""
    generator = torch.Generator().manual_seed(seed)
    u_T = data.sample(n, sde.T, generator)
    steps = options.pop("steps", None)
    return sampling.sample(sde, hybrid(sde, data.score), (n, len(data.mu)), method, steps, generator=generator,
                           x_T=u_T, **options)


# Discretisation bias of the data samples (N(MU, S^2) data, CLD defaults), measured with n = 200,000 per
# entry (standard errors 0.0022 on the mean in units of S, 0.0032 on the relative variance):
#   method      steps     mean bias / S    relative variance bias     NFE
#   em          100       0.038            +0.050                     100
#   splitting   100       0.033            -0.043                     100
#   pc          100       0.035            +0.038                     200
#   heun        50        0.024            +0.034                      99
#   ode         rtol 1e-5 0.004            -0.004                     230
# The allowances are those plus 0.01, rounded up to 0.005.
COUPLED_FAST = {
    "em": (dict(steps=100), 0.05, 0.06),
    "splitting": (dict(steps=100), 0.045, 0.055),
    "pc": (dict(steps=100), 0.045, 0.05),
    "heun": (dict(steps=50), 0.035, 0.045),
    "ode": (dict(), 0.015, 0.015),
}


@pytest.mark.parametrize("method", list(COUPLED_FAST))
def test_coupled_samples_match_gaussian_data(cld, method):
    """sample() takes the data shape [n, C], samples the state from exact draws of p_T and returns the
    data component, distributed as the data N(MU, S^2) (n = 6000 per entry)."""
    data = CoupledGaussian(cld)
    options, mean_allowance, var_allowance = COUPLED_FAST[method]
    out = sample_x(cld, data, method, 6000, seed=1, **options)
    assert out.x.shape == (6000, 2)
    assert_standard_normal((out.x - data.mu) / S, f"cld {method}", mean_allowance, var_allowance)


# The same at n = 100,000 with finer steps; bias measured with n = 200,000 (errors as above):
#   em 400: 0.008 / +0.011    splitting 400: 0.011 / -0.012    heun 200: 0.004 / +0.008
# allowances: those + 0.01, rounded up to 0.005.
COUPLED_SLOW = {
    "em": (dict(steps=400), 0.02, 0.025),
    "splitting": (dict(steps=400), 0.025, 0.025),
    "heun": (dict(steps=200), 0.015, 0.02),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(COUPLED_SLOW))
def test_coupled_samples_match_gaussian_data_fine_steps(cld, method):
    data = CoupledGaussian(cld)
    options, mean_allowance, var_allowance = COUPLED_SLOW[method]
    out = sample_x(cld, data, method, 100_000, seed=2, **options)
    assert_standard_normal((out.x - data.mu) / S, f"cld {method}", mean_allowance, var_allowance)


def flow_error(sde, data, run):
    """Max error of a deterministic sampler's state at eps (run(u_T) -> u_eps) against the exact flow map
    (scipy), on 64 exact draws of p_T; per component: (data, auxiliary)."""
    u_T = data.sample(64, sde.T, torch.Generator().manual_seed(0))
    Psi, psi = flow_map(data, float(sde.T), float(sde.eps))
    expected = sde.join(torch.from_numpy(Psi @ components(sde, u_T).numpy() + psi).unbind(1))
    out = run(u_T)
    assert out.shape == u_T.shape  # the lower-level functions take and return the state
    return [part.abs().max().item() for part in sde.split(out - expected)]


def test_coupled_flow_ode_converges_to_the_exact_flow_map(cld):
    """The whole state at eps: below 30 tol at rtol = atol = tol in {1e-5, 1e-7} (measured 13 and 10 tol,
    on the position), and shrinking at least tenfold between them (measured 126-fold)."""
    data = CoupledGaussian(cld)
    errors = [max(flow_error(cld, data, lambda u_T: sampling.probability_flow(
        cld, data.score, u_T.shape, x_T=u_T, rtol=tol, atol=tol).x)) for tol in (1e-5, 1e-7)]
    assert errors[0] < 30 * 1e-5 and errors[1] < 30 * 1e-7, errors
    assert errors[1] < errors[0] / 10, errors


def test_coupled_heun_converges_to_the_exact_flow_map(cld):
    """Heun on CLD's flow: the data component's error falls as steps^-p with log2(e(200) / e(400)) in
    [1.5, 2.2] (measured 1.72: below 2, as the flow is stiff near eps, where the velocity's conditional
    variance is gamma M), and e(400) < 0.01 (measured 0.0057)."""
    data = CoupledGaussian(cld)
    coarse, fine = (flow_error(cld, data, lambda u_T: sampling.heun(cld, data.score, u_T.shape, steps, x_T=u_T).x)[
        cld.data_index] for steps in (200, 400))
    observed = math.log2(coarse / fine)
    assert 1.5 <= observed <= 2.2 and fine < 0.01, (coarse, fine, observed)


# --- the splitting sampler ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cld", "schedule"])
def test_gaussian_half_steps_solve_the_linear_reverse_sde(coupled, name):
    """E, e and R R^T of a half step against the ODEs they solve, dE/dr = M E, de/dr = M e + b,
    dC/dr = M C + C M^T + D0 (M = -(F0 + D0 P), b = D0 P mu_T), over r-increments from 1e-5 to 0.5:
    float64 rounding only (measured at most 1e-14 absolute)."""
    sde, K = coupled[name], 2
    P = torch.cholesky_inverse(sde._prior_chol).numpy()
    F0, D0 = sde.F0.numpy(), sde.D0.numpy()
    M, b = -(F0 + D0 @ P), D0 @ P @ sde._prior_mean.numpy()

    def rhs(r, y):
        E, e, C = y[:4].reshape(K, K), y[4:6], y[6:].reshape(K, K)
        return np.concatenate([(M @ E).ravel(), M @ e + b, (M @ C + C @ M.T + D0).ravel()])
    increments = torch.tensor([1e-5, 1e-3, 0.05, 0.5], dtype=F64)
    half = sampling._gaussian_half_steps(sde, increments)
    for j, h in enumerate(increments.tolist()):
        y = solve_linear(rhs, np.concatenate([np.eye(K).ravel(), np.zeros(K), np.zeros(K * K)]), 0.0, h)
        np.testing.assert_allclose(half.E[j].numpy(), y[:4].reshape(K, K), rtol=0, atol=1e-12)
        np.testing.assert_allclose(half.e[j].numpy(), y[4:6], rtol=0, atol=1e-12)
        np.testing.assert_allclose((half.R[j] @ half.R[j].T).numpy(), y[6:].reshape(K, K), rtol=0, atol=1e-12)


def recorder(seen: list):
    """An after_step callback that keeps the state after every step."""
    def after(u, t):
        seen.append(u)
        return u
    return after


@pytest.mark.parametrize("name", ["cld", "schedule"])
def test_splitting_is_exact_for_the_prior_score(coupled, name):
    """With s = s_G the score step vanishes and the Gaussian half steps compose to the exact transition of
    the (then linear) reverse SDE, whatever the step count. From the point u_T = (2, -1), 3 steps, the
    state after each step (t ~ 2/3, 1/3, eps) against the linear SDE's moments (scipy):
    - the map of u_T, from two runs from u_T and u_T + delta with the same noise, to 1e-10;
    - 20,000 x 2 samples whitened by the exact mean and covariance are N(0, I) within 5 standard errors,
      cross-covariance included.
    Euler-Maruyama in 3 steps ends CLD with a mean of 80 instead of 0.01 (its steps are unstable here).
    On `schedule` phi(t) varies, so each step's two half steps differ in r, and mu_T != 0."""
    sde = coupled[name]
    n, score = 20000, prior_score(sde)
    grid = torch.linspace(float(sde.T), float(sde.eps), 4, dtype=F64)[1:].tolist()  # the sampler's grid
    point = torch.tensor([[2.0, 2.0, -1.0, -1.0]], dtype=F64)      # x = 2, v = -1 in both entries
    shift = torch.tensor([[1e-3, 0.0, 2e-3, 0.0]], dtype=F64)       # entry 0 only
    paths = []
    for start in (point, point + shift):
        paths.append([])
        sampling.splitting(sde, score, (1, 4), 3, x_T=start, generator=torch.Generator().manual_seed(0),
                           after_step=recorder(paths[-1]))
    seen = []
    sampling.splitting(sde, score, (n, 4), 3, x_T=point.expand(n, 4), generator=torch.Generator().manual_seed(1),
                       after_step=recorder(seen))
    exact = linear_reverse_moments(sde, [2.0, -1.0], grid)
    base = [m for m, _ in linear_reverse_moments(sde, [0.0, 0.0], grid)]
    unit = [[m for m, _ in linear_reverse_moments(sde, e, grid)] for e in np.eye(2)]
    for i, t in enumerate(grid):
        mean, cov = exact[i]
        moved = [unit[k][i] - base[i] for k in range(2)]
        response = components(sde, paths[1][i] - paths[0][i])[0, :, 0]
        expected = torch.from_numpy(np.stack(moved, 1) @ np.array([1e-3, 2e-3]))
        torch.testing.assert_close(response, expected, rtol=0, atol=1e-10)
        y = components(sde, seen[i]) - torch.from_numpy(mean)[:, None]           # [n, K, C]
        w = torch.linalg.solve_triangular(torch.linalg.cholesky(torch.from_numpy(cov)), y, upper=False)
        w = w.transpose(1, 2).reshape(-1, 2)                                     # [n C, K]
        assert_standard_normal(w, f"whitened splitting samples at t = {t:.3g}")
        cross = (w[:, 0] * w[:, 1]).mean().item()
        assert abs(cross) <= 5 / math.sqrt(w.shape[0]), f"cross-covariance {cross:.4f} at t = {t:.3g}"


def mean_response_error(sde, method, steps):
    """The sampler's response of the data samples to the data mean, d x_eps / d mu, against the reverse
    SDE's (scipy). With the exact Gaussian score every step is affine in (u, mu) for fixed noise, so two
    runs with mu and mu + delta sharing u_T and the noise give it exactly: deterministic, no Monte Carlo.
    The reference: dm/dt = (F + D Sigma_t^-1) m - D Sigma_t^-1 Phi_t e_x mu from m(T) = u_T, differentiated
    in mu: r' = (F + D Sigma_t^-1) r - D Sigma_t^-1 Phi_t e_x, r(T) = 0, from T to eps."""
    data = CoupledGaussian(sde)

    def rhs(t, r):
        F, D = matrices(sde, t)
        Phi = sde.kernel(full(t, 1))[0][0].numpy()
        precision = np.linalg.inv(data.moments(full(t, 1))[1][0].numpy())
        return (F + D @ precision) @ r - D @ precision @ Phi[:, sde.data_index]
    expected = solve_linear(rhs, np.zeros(2), float(sde.T), float(sde.eps))[sde.data_index]
    u_T = data.sample(1, sde.T, torch.Generator().manual_seed(3))
    delta = 1e-3
    runs = [sampling.sample(sde, CoupledGaussian(sde, mu).score, (1, 2), method, steps, x_T=u_T,
                            generator=torch.Generator().manual_seed(4)).x
            for mu in (MU, tuple(m + delta for m in MU))]
    return ((runs[1] - runs[0]) / delta - expected).abs().max().item()


@pytest.mark.parametrize("method", ["splitting", "em"])
def test_mean_response_converges_at_first_order(cld, method):
    """The error of d x_eps / d mu (see mean_response_error) halves as the steps double:
    log2(e(100) / e(200)) within 0.15 of 1. Splitting is first order too: its score step is Euler on
    D0 (s - s_G), which is large near eps. Measured e(100), order: splitting 0.0169, 1.03; em 0.0189, 1.00."""
    coarse, fine = (mean_response_error(cld, method, steps) for steps in (100, 200))
    observed = math.log2(coarse / fine)
    assert abs(observed - 1) < 0.15, f"{method}: observed order {observed:.3f}"


# --- the Langevin corrector on a coupled state ----------------------------------------------------------------

def test_langevin_mask_moves_the_noisy_components_only(cld):
    """With the noisy components' mask the step is x + delta s + sqrt(2 delta) z on them, with delta from
    their norms only, and leaves the others exactly in place."""
    data = CoupledGaussian(cld)
    u = data.sample(5, 0.3, torch.Generator().manual_seed(0))
    t = full(0.3, 5)
    mask = sampling._noise_mask(cld, u)
    new = sampling.langevin_step(data.score, u, t, 0.3, torch.Generator().manual_seed(1), mask=mask)
    x, v = cld.split(u)
    assert torch.equal(cld.split(new)[0], x)
    z = cld.split(torch.randn(u.shape, generator=torch.Generator().manual_seed(1), dtype=F64))[1]
    s = cld.split(data.score(u, t))[1]
    delta = 2 * (0.3 * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2
    torch.testing.assert_close(cld.split(new)[1], v + delta * s + (2 * delta).sqrt() * z, rtol=1e-14, atol=1e-14)


def test_langevin_corrector_keeps_the_conditional_law(cld):
    """Masked Langevin steps with the batch rule are Langevin dynamics on p_t(v | x) = N(m(x), c): the chain
    is stationary at conditional variance c (1 + snr^2) (the derivation of the affine corrector test, with
    V -> c), and x never moves. snr = 0.5: 25 % above c; 30 steps from p_t reach it (each multiplies the
    distance by 0.36). Residual v - m(x) within 5 standard errors (n = 20,000 x 2 entries)."""
    data = CoupledGaussian(cld)
    n, snr, t = 20000, 0.5, 0.3
    generator = torch.Generator().manual_seed(5)
    u = data.sample(n, t, generator)
    mask = sampling._noise_mask(cld, u)
    x = cld.split(u)[0]
    for _ in range(30):
        u = sampling.langevin_step(data.score, u, full(t, n), snr, generator, mask=mask)
    assert torch.equal(cld.split(u)[0], x)
    mean, var = data.conditional(x, t)
    residual = (cld.split(u)[1] - mean) / math.sqrt(var * (1 + snr**2))
    assert_standard_normal(residual.reshape(-1, 1), "conditional law of v after Langevin steps")


# --- NFE, denoise, dtypes, host synchronisation -------------------------------------------------------------

@pytest.mark.parametrize("method, nfe", [("em", 7), ("pc", 7 * 3), ("heun", 2 * 7 - 1), ("splitting", 7)])
@pytest.mark.parametrize("denoise", [True, False])
def test_coupled_nfe_and_denoise(cld, method, nfe, denoise):
    """One score call per step (pc: 2 corrector steps), each on the whole batch; denoise adds none on a
    coupled SDE and changes nothing."""
    data = CoupledGaussian(cld)
    calls = []

    def score(u, t):
        calls.append(u.shape)
        return data.score(u, t)
    options = {"corrector_steps": 2} if method == "pc" else {}
    runs = [sampling.sample(cld, score, (16, 2), method, 7, denoise=d, generator=torch.Generator().manual_seed(0),
                            **options) for d in (denoise, not denoise)]
    assert runs[0].nfe == nfe == len(calls) // 2
    assert all(shape == (16, 4) for shape in calls)
    assert torch.equal(runs[0].x, runs[1].x)


@pytest.mark.parametrize("method", ["em", "pc", "heun", "ode"])
def test_general_denoise_changes_nothing(cubic, method):
    steps = None if method == "ode" else 5
    runs = [sampling.sample(cubic, lambda x, t: -x, (8, 3), method, steps, denoise=d,
                            generator=torch.Generator().manual_seed(0)) for d in (True, False)]
    assert torch.equal(runs[0].x, runs[1].x) and runs[0].nfe == runs[1].nfe


@pytest.mark.parametrize("method", ["em", "pc", "heun", "ode", "splitting"])
def test_coupled_float32_images(other_examples, method):
    """float32 data [B, 1, 4, 4] -> state [B, 2, 4, 4]: shape and dtype kept, finite values."""
    sde = other_examples["cld"].build(dtype=torch.float32)
    score = lambda u, t: -u  # noqa: E731  (any smooth score: this checks shapes and dtypes)
    steps = None if method == "ode" else 20
    out = sampling.sample(sde, score, (16, 1, 4, 4), method, steps, generator=torch.Generator().manual_seed(0))
    assert out.x.shape == (16, 1, 4, 4) and out.x.dtype == torch.float32
    assert torch.isfinite(out.x).all()


@pytest.mark.parametrize("method", ["heun", "ode"])
def test_coupled_float32_agrees_with_float64(other_examples, method):
    """From the same u_T, float32 ends within 1e-4 of float64 (samples of order 1; measured 2e-6)."""
    runs = []
    for dtype in (F64, torch.float32):
        sde = other_examples["cld"].build(dtype=dtype)
        data = CoupledGaussian(sde)
        u_T = data.sample(256, sde.T, torch.Generator().manual_seed(0), dtype=dtype)
        runs.append(sampling.sample(sde, data.score, (256, 2), method, None if method == "ode" else 50, x_T=u_T).x)
    assert runs[1].dtype == torch.float32
    torch.testing.assert_close(runs[1].double(), runs[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["em", "pc", "heun", "splitting"])
def test_coupled_samplers_never_read_tensor_values_on_the_host(cld, method, monkeypatch):
    """No host-device synchronisation from start to end (see tests/test_sampling.py's affine version)."""
    def forbidden(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host")
    score = prior_score(cld)  # the test's exact score reads values (torch.unique); the sampler must not
    for name in ("__bool__", "item", "__float__", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = sampling.sample(cld, score, (8, 2), method, 4, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert torch.isfinite(out.x).all()


# --- general SDEs ---------------------------------------------------------------------------------------------

# x = sinh(y) with y an OU process dy = -y dt + sqrt(2) dw: by Ito, dx = cosh(y) dy + sinh(y) dt, i.e.
# the drift x - sqrt(1 + x^2) asinh(x) and g = sqrt(2 (1 + x^2)). For y0 ~ N(A0, B0),
# y_t ~ N(A0 e^-t, B0 e^-2t + 1 - e^-2t), so p_t(x) = N(asinh x; m_t, V_t) / sqrt(1 + x^2).
SINH_OU = """sde sinh_ou

dx = (x - sqrt(1 + x^2) * log(x + sqrt(1 + x^2))) dt + sqrt(2 * (1 + x^2)) dw

t in [1e-3, 1]
steps 1000
prior normal(0, 1)
weighting 1
"""
A0, B0 = 0.8, 0.09


@pytest.fixture(scope="module")
def sinh_ou():
    return sdelang.load(SINH_OU).double()


def sinh_moments(t):
    """m_t and V_t of y = asinh(x) at time t (t a tensor)."""
    decay = torch.exp(-t.to(F64))
    return A0 * decay, B0 * decay**2 + 1 - decay**2


def sinh_score(x, t):
    """d/dx log p_t(x) = -(asinh x - m) / (V sqrt(1 + x^2)) - x / (1 + x^2)."""
    m, V = (v.to(x.dtype)[:, None] for v in sinh_moments(t))
    return -(torch.asinh(x) - m) / (V * torch.sqrt(1 + x**2)) - x / (1 + x**2)


def sinh_log_prob(x, t):
    m, V = (v[:, None] for v in sinh_moments(t))
    y = torch.asinh(x)
    return (-0.5 * (y - m) ** 2 / V - 0.5 * torch.log(2 * math.pi * V) - 0.5 * torch.log1p(x**2)).sum(1)


def sinh_sample(n, t, generator, d=2):
    m, V = sinh_moments(full(t, 1))
    return torch.sinh(m + V.sqrt() * torch.randn(n, d, generator=generator, dtype=F64))


# Bias of asinh(x) at eps in units of sqrt(V_eps), measured with n = 200,000 (standard errors 0.0022 on
# the mean, 0.0032 on the relative variance): em 200 steps: mean -0.007, variance +0.046; pc 200:
# 0.0005, +0.045; heun 50: -0.0006, +0.021; ode: 0.0015, -0.0038. Allowances: those + 0.01, rounded up
# to 0.005.
GENERAL_FAST = {
    "em": (dict(steps=200), 0.02, 0.06),
    "pc": (dict(steps=200), 0.015, 0.055),
    "heun": (dict(steps=50), 0.015, 0.035),
    "ode": (dict(), 0.015, 0.015),
}


@pytest.mark.parametrize("method", list(GENERAL_FAST))
def test_general_samples_match_the_sinh_ou_marginal(sinh_ou, method):
    """From exact draws of p_T, asinh of the samples is N(m_eps, V_eps) (n = 4000 x 2 entries): a
    state-dependent g whose reverse drift needs the d(g^2)/dx correction, and a non-stationary score."""
    options, mean_allowance, var_allowance = GENERAL_FAST[method]
    generator = torch.Generator().manual_seed(6)
    x_T = sinh_sample(4000, sinh_ou.T, generator)
    steps = options.get("steps")
    out = sampling.sample(sinh_ou, sinh_score, x_T.shape, method, steps, x_T=x_T, generator=generator)
    m, V = sinh_moments(full(sinh_ou.eps, 1))
    w = ((torch.asinh(out.x) - m) / V.sqrt()).reshape(-1, 1)
    assert_standard_normal(w, f"sinh_ou {method}", mean_allowance, var_allowance)


@pytest.mark.parametrize("method", ["em", "pc"])
def test_general_stochastic_samplers_keep_the_stationary_law(cubic, method):
    """cubic_langevin with data N(0, 1): p_t = N(0, 1) and s = -x at every t. From the prior, em and pc keep
    N(0, 1) (200 steps; n = 4000 x 2) and forget the start: the correlation of the samples with x_T is
    within 5 standard errors (1 / sqrt(n)) of that of the reversed stationary process over [eps, T],
    which is small. Measured at n = 200,000 (standard errors 0.0022, 0.0032): em mean 0.0015, variance
    +0.005, correlation 0.003; pc 0.001, +0.020 (the corrector's snr^2), 0.0005. Allowances: those + 0.01,
    rounded up to 0.005. Without the d(g^2)/dx term the reverse drift would be beta x + beta x^3 / 4 and
    the samples would explode."""
    generator = torch.Generator().manual_seed(7)
    x_T = cubic.prior_sampling((4000, 2), generator=generator)
    out = sampling.sample(cubic, lambda x, t: -x, x_T.shape, method, 200, x_T=x_T, generator=generator)
    assert_standard_normal(out.x, f"cubic_langevin {method}", 0.015, 0.03 if method == "pc" else 0.015)
    correlation = (out.x * x_T).mean().item()
    assert abs(correlation) <= 0.005 + 5 / math.sqrt(out.x.numel())


@pytest.mark.parametrize("method", ["heun", "ode"])
def test_general_flow_is_at_rest_at_stationarity(cubic, method):
    """With s = -x the flow drift f - d(g^2)/dx / 2 - g^2 s / 2 = -beta x^3 / 4 - beta x / 2
    + beta (1 + x^2 / 2) x / 2 vanishes: the deterministic samplers return their start (rounding only)."""
    x_T = cubic.prior_sampling((64, 2), generator=torch.Generator().manual_seed(8))
    out = sampling.sample(cubic, lambda x, t: -x, x_T.shape, method, None if method == "ode" else 20, x_T=x_T)
    torch.testing.assert_close(out.x, x_T, rtol=0, atol=1e-10)


# --- likelihood ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(exact_trace=True), dict(probes=3)])
def test_general_likelihood_at_stationarity(cubic, options):
    """cubic_langevin, s = -x: the flow drift is 0 and its divergence div f + div(-d(g^2)/dx / 2 - g^2 s / 2)
    = -3 beta x^2 / 4 + 3 beta x^2 / 4 = 0, so log p_eps(x) = log N(x; 0, I) exactly. The correction's
    Jacobian is diagonal, so Rademacher probes are exact too."""
    x = torch.tensor([[0.0, 0.5], [-1.2, 2.0], [3.0, -0.3]], dtype=F64)
    result = log_likelihood(cubic, lambda x, t: -x, x, generator=torch.Generator().manual_seed(0), **options)
    expected = -0.5 * (x**2).sum(1) - math.log(2 * math.pi)
    torch.testing.assert_close(result.logp, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("options", [dict(exact_trace=True), dict(probes=2)])
def test_general_likelihood_equals_the_sinh_ou_density(sinh_ou, options):
    """sinh_ou with its exact score and p_T as the prior: the flow-ODE density at eps is p_eps(x) (d = 2,
    diagonal Jacobian: Rademacher probes are exact). Tolerance 1e-3 nats per dimension (measured 2e-6)."""
    sinh_ou.prior_logp = lambda z: sinh_log_prob(z, full(sinh_ou.T, z.shape[0]))
    x = sinh_sample(6, sinh_ou.eps, torch.Generator().manual_seed(9))
    result = log_likelihood(sinh_ou, sinh_score, x, generator=torch.Generator().manual_seed(1), **options)
    torch.testing.assert_close(result.logp, sinh_log_prob(x, full(sinh_ou.eps, 6)), rtol=0, atol=2e-3)


def use_p_T_as_prior(sde, data: CoupledGaussian):
    """The compiled prior drops the data term of p_T: with p_T itself the flow density at eps is p_eps."""
    sde.prior_logp = lambda u: data.log_prob(u, full(sde.T, u.shape[0]))
    return sde


def init_log_prob(sde, u0):
    """log N(v0; mean0, Sigma0) of the auxiliary component (K = 2), summed over the entries."""
    j = 1 - sde.data_index
    var, mean = float(sde.Sigma0[j, j]), float(sde.mean0[j])
    v = sde.split(u0)[j]
    return (-0.5 * (v - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)).sum(1)


def test_coupled_likelihood_is_the_joint_density_minus_the_auxiliary_draw(other_examples):
    """For data x: u0 = init_sampling(x, generator) (drawn first), and with the exact score and p_T as the
    prior, logp = log p_eps(u0) - log q(v0), computed from CoupledGaussian and N(v0; 0, gamma M) directly.
    Tolerance 1e-3 nats per data dimension (measured 4e-6)."""
    data = CoupledGaussian(other_examples["cld"].build())
    sde = use_p_T_as_prior(other_examples["cld"].build(), data)
    x = data.mu + S * torch.randn(5, 2, generator=torch.Generator().manual_seed(10), dtype=F64)
    result = log_likelihood(sde, data.score, x, exact_trace=True, generator=torch.Generator().manual_seed(11))
    u0 = sde.init_sampling(x, torch.Generator().manual_seed(11))
    assert torch.equal(sde.data(u0), x)
    expected = data.log_prob(u0, full(sde.eps, 5)) - init_log_prob(sde, u0)
    torch.testing.assert_close(result.logp, expected, rtol=0, atol=2e-3)


def test_coupled_likelihood_with_the_compiled_prior(cld):
    """With the compiled prior: logp = log prior(Psi u0 + psi) + C log det Psi - log q(v0), Psi the flow map
    eps -> T (scipy). The prior drops p_T's data term; the two differ here by about 1e-5 nats."""
    data = CoupledGaussian(cld)
    x = data.mu + S * torch.randn(5, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    result = log_likelihood(cld, data.score, x, exact_trace=True, generator=torch.Generator().manual_seed(13))
    u0 = cld.init_sampling(x, torch.Generator().manual_seed(13))
    Psi, psi = flow_map(data, float(cld.eps), float(cld.T))
    u_T = cld.join(torch.from_numpy(Psi @ components(cld, u0).numpy() + psi).unbind(1))
    expected = cld.prior_logp(u_T) + 2 * math.log(abs(np.linalg.det(Psi))) - init_log_prob(cld, u0)
    torch.testing.assert_close(result.logp, expected, rtol=0, atol=2e-3)


def test_coupled_likelihood_bound_gap_is_the_kl(other_examples):
    """Averaged over v0 ~ q the coupled likelihood is log p(x) - KL(q || p(v0 | x)). At the module's eps
    the gap is 1e-5 nats, so the test starts the flow at eps = 0.1 instead (the identity holds at any
    start), where p_0.1(v | x) = N(m(x), c) is far from q = N(0, gamma M): KL ~ 1 nat per entry. Exact score,
    p_T prior, 400 datapoints: mean of logp - [log p_0.1(x) - KL] within 5 standard errors of 0, and the KL
    term is many standard errors away from 0 (so the test sees it)."""
    data = CoupledGaussian(other_examples["cld"].build())
    sde = use_p_T_as_prior(other_examples["cld"].build(), data)
    sde.eps = 0.1
    n = 400
    x = data.mu + S * torch.randn(n, 2, generator=torch.Generator().manual_seed(14), dtype=F64)
    result = log_likelihood(sde, data.score, x, exact_trace=True, generator=torch.Generator().manual_seed(15))
    mean, cov = data.moments(full(0.1, 1))
    i = sde.data_index
    log_px = (-0.5 * (x - mean[0, i]) ** 2 / cov[0, i, i] - 0.5 * torch.log(2 * math.pi * cov[0, i, i])).sum(1)
    m, c = data.conditional(x, 0.1)
    q = float(sde.Sigma0[1 - i, 1 - i])
    kl = (0.5 * (math.log(c / q) + (q + m**2) / c - 1)).sum(1)
    gap = result.logp - (log_px - kl)
    stderr = gap.std().item() / math.sqrt(n)
    assert abs(gap.mean().item()) <= 5 * stderr, f"gap {gap.mean():.4f} +- {stderr:.4f}"
    assert kl.mean().item() > 20 * stderr


def test_coupled_hutchinson_is_unbiased(cld):
    """One datapoint, 400 rows of 2 probes: each row draws its own v0 and probes. Their mean is within 5
    standard errors of the exact-trace mean over other v0 draws (which differ by the v0 spread only)."""
    data = CoupledGaussian(cld)
    x = torch.tensor([[0.3, -0.8]], dtype=F64)
    rows = 400
    estimate = log_likelihood(cld, data.score, x.repeat(rows, 1), probes=2, generator=torch.Generator().manual_seed(16))
    exact = log_likelihood(cld, data.score, x.repeat(rows, 1), exact_trace=True,
                           generator=torch.Generator().manual_seed(17))
    assert torch.isfinite(estimate.stderr).all() and (estimate.stderr > 0).all()
    difference = estimate.logp.mean() - exact.logp.mean()
    stderr = math.sqrt(estimate.logp.var().item() / rows + exact.logp.var().item() / rows)
    assert abs(difference.item()) <= 5 * stderr


class ExactModel:
    """What evaluate.nll needs of a score model: .sde, and the score as model(u, t)."""

    def __init__(self, sde, score):
        self.sde, self.score = sde, score

    def __call__(self, u, t):
        return self.score(u, t)


def test_nll_counts_the_data_dimensions(cld):
    """evaluate.nll on a coupled SDE: bits/dim over the D = 2 data entries (not the K D = 4 of the state),
    bpd = nll / (D ln 2) for continuous data."""
    data = CoupledGaussian(cld)
    model = ExactModel(cld, data.score)
    x = data.mu + S * torch.randn(8, 2, generator=torch.Generator().manual_seed(18), dtype=F64)
    dataset = SimpleNamespace(x=x, levels=None, scale=1.0)
    result = nll(model, dataset, n=8, exact_trace=True)
    assert result.n == 8
    assert result.bpd == pytest.approx(result.nll_nats / (2 * math.log(2)), rel=1e-12)
    with pytest.raises(ValueError, match="ScoreFlow Theorem 3.*derived for scalar kernels only"):
        nll(model, dataset, n=8, with_bound=True)


# --- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", KERNEL_SAMPLERS)
@pytest.mark.parametrize("name", ["cld", "cubic_langevin"])
def test_kernel_samplers_refuse_other_kinds(other_examples, name, method):
    """A ValueError that quotes the module's own reason and names the samplers that work."""
    sde = other_examples[name].build()
    reason = sde.unavailable["exact-kernel samplers (reverse_diffusion, ancestral, ald, ddim, dpm2)"]
    works = "em, pc, ode, heun, splitting, exponential" if name == "cld" else "em, pc, ode, heun"
    with pytest.raises(ValueError) as info:
        sampling.sample(sde, lambda x, t: -x, (4, 2), method, 3)
    message = str(info.value)
    assert f"{method} needs the scalar Gaussian kernel" in message and f"is a {sde.kind} SDE" in message
    assert reason in message and f"Samplers that work on it: {works}" in message
    assert sampling.methods_for(sde) == tuple(works.split(", "))


@pytest.mark.parametrize("call, message", [
    (lambda s: sampling.sample(s, lambda x, t: -x, (4, 2), "em", 3, spacing="logsnr"),
     "spacing 'logsnr' needs the scalar Gaussian kernel"),
    (lambda s: sampling.sample(s, lambda x, t: -x, (4, 2), "pc", 3, predictor="reverse_diffusion"),
     "pc with the reverse_diffusion predictor needs"),
    (lambda s: sampling.inpaint(s, lambda x, t: -x, torch.zeros(4, 2), torch.ones(2), "em", 3), "inpainting"),
])
@pytest.mark.parametrize("name", ["cld", "cubic_langevin"])
def test_kernel_features_refuse_other_kinds(other_examples, name, call, message):
    sde = other_examples[name].build()
    with pytest.raises(ValueError, match=message):
        call(sde)


@pytest.mark.parametrize("name", ["cld", "cubic_langevin"])
def test_bound_refuses_other_kinds(other_examples, name):
    sde = other_examples[name].build()
    with pytest.raises(ValueError) as info:
        bound(sde, lambda x, t: -x, torch.zeros(2, 2))
    assert sde.unavailable["likelihood bound (ScoreFlow Theorem 3)"] in str(info.value)
    assert "Use log_likelihood" in str(info.value)


def test_splitting_needs_a_coupled_sde(examples, cubic):
    for sde in (examples["vp"].build(), cubic):
        with pytest.raises(ValueError, match="splitting needs a coupled linear SDE"):
            sampling.sample(sde, lambda x, t: -x, (4, 2), "splitting", 3)


def test_coupled_sample_needs_a_data_shape(cld):
    with pytest.raises(ValueError, match=r"data of shape \[B, C, ...\]"):
        sampling.sample(cld, lambda u, t: -u, (4,), "em", 3)


@pytest.mark.cuda
def test_coupled_sampling_and_likelihood_on_cuda(other_examples):
    """On a CUDA device: samples and log-likelihoods stay there and are finite, and the flow ODE, which
    draws no noise, ends where it does on the CPU: float64 solves at rtol = atol = 1e-8, compared at 1e-6
    (as in tests/test_runtime_devices.py)."""
    cpu = other_examples["cld"].build()
    u_T = CoupledGaussian(cpu).sample(64, cpu.T, torch.Generator().manual_seed(0))
    x = torch.tensor(MU, dtype=F64) + S * torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    flows = []
    for device in ("cpu", "cuda"):
        sde = other_examples["cld"].build().to(device)
        data = CoupledGaussian(sde)
        flows.append(sampling.sample(sde, data.score, (64, 2), "ode", x_T=u_T.to(device), rtol=1e-8, atol=1e-8).x)
        split = sampling.sample(sde, data.score, (64, 2), "splitting", 20, x_T=u_T.to(device),
                                generator=torch.Generator(device).manual_seed(2)).x
        logp = log_likelihood(sde, data.score, x.to(device), exact_trace=True,
                              generator=torch.Generator(device).manual_seed(3)).logp
        for result in (flows[-1], split, logp):
            assert result.device.type == device and torch.isfinite(result).all()
    torch.testing.assert_close(flows[1].cpu(), flows[0], rtol=0, atol=1e-6)


def test_the_deterministic_methods_are_those_that_draw_no_noise(examples, cld):
    """DETERMINISTIC (what `sdelang sample` names as following the flow) holds exactly the methods whose samples
    from a fixed x_T do not change with the generator: each method runs twice from the same x_T with two seeds."""
    from sdelang.runtime.gaussian import GaussianData
    from sdelang.runtime.sampling.common import ALL_METHODS, COUPLED_SAMPLERS, DETERMINISTIC

    vp = examples["vp"].build()
    vp_score = GaussianData(vp, 0.5, 0.5, (2,)).score
    cld_score = CoupledGaussian(cld).score
    found = set()
    for method in ALL_METHODS:
        sde, score, width = (cld, cld_score, 4) if method in COUPLED_SAMPLERS else (vp, vp_score, 2)
        x_T = torch.randn(8, width, dtype=F64, generator=torch.Generator().manual_seed(3))
        steps = None if method == "ode" else 6
        runs = [sampling.sample(sde, score, (8, 2), method, steps, x_T=x_T,
                                generator=torch.Generator().manual_seed(seed)).x for seed in (0, 1)]
        if torch.equal(runs[0], runs[1]):
            found.add(method)
    assert found == set(DETERMINISTIC)
