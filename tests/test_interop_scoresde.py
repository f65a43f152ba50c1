"""Compiled SDEs through score_sde_pytorch's code paths, via sdelang.interop.scoresde.

score_sde_pytorch is not installable (TensorFlow), so `score_sde` below restates, from its published
interface (sde_lib, models/utils.get_score_fn, losses, sampling), what each entry point does with an SDE
object: which isinstance branch it takes, which attributes and tables it reads, and the update it makes.
Data N(0.3, 0.5^2) of shape [1, 1, 1] (score_sde indexes [:, None, None, None]); exact scores and flow
maps from interop_reference.py.
"""
from __future__ import annotations

import abc
import math
import types

import numpy as np
import pytest
import torch
from scipy import integrate

import sdelang
from interop_reference import EXAMPLES, exact_flow, exact_score, kernel, marginal
from sdelang.interop import scoresde

SDES = ["vp", "ve", "subvp", "cosine_vp", "ou"]
ROLES = {"vp": "VPSDE", "cosine_vp": "VPSDE", "vdm": "VPSDE", "ve": "VESDE", "edm_ve": "VESDE", "subvp": "subVPSDE",
         "ou": "subVPSDE"}
SHAPE = (1, 1, 1)


def _lib():
    """score_sde's sde_lib: an abstract SDE class (abc.ABC) and three subclasses, dispatched on."""
    class SDE(abc.ABC):
        pass

    class VPSDE(SDE):
        pass

    class subVPSDE(SDE):  # noqa: N801 (score_sde's name)
        pass

    class VESDE(SDE):
        pass
    return types.SimpleNamespace(SDE=SDE, VPSDE=VPSDE, subVPSDE=subVPSDE, VESDE=VESDE)


sde_lib = _lib()


def col(v):
    return v[:, None, None, None]


class score_sde:  # noqa: N801
    """score_sde's entry points as they act on an SDE object (restated, see the module docstring)."""

    @staticmethod
    def get_score_fn(sde, model, continuous=True):
        """VP/subVP: the model predicts noise, score = -model(x, 999 t) / std (subVP always continuous; VP
        discrete reads std from sqrt_1m_alphas_cumprod at t (N - 1)). VE: the model's output is the score,
        labelled by std (continuous) or by round((T - t)(N - 1)). Anything else: NotImplementedError."""
        if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
            def score_fn(x, t):
                if continuous or isinstance(sde, sde_lib.subVPSDE):
                    std = sde.marginal_prob(torch.zeros_like(x), t)[1]
                    return -model(x, t * 999) / col(std)
                labels = t * (sde.N - 1)
                return -model(x, labels) / col(sde.sqrt_1m_alphas_cumprod[labels.long()])
        elif isinstance(sde, sde_lib.VESDE):
            def score_fn(x, t):
                labels = sde.marginal_prob(torch.zeros_like(x), t)[1] if continuous else \
                    torch.round((sde.T - t) * (sde.N - 1)).long()
                return model(x, labels)
        else:
            raise NotImplementedError(f"SDE class {type(sde).__name__} not yet supported.")
        return score_fn

    @staticmethod
    def sde_loss(sde, model, batch, likelihood_weighting=False, eps=1e-5):
        """get_sde_loss_fn (reduce_mean): t ~ U(eps, T), x_t from marginal_prob, |s std + z|^2 averaged,
        or |s + z / std|^2 g^2."""
        score_fn = score_sde.get_score_fn(sde, model)
        t = torch.rand(batch.shape[0], dtype=batch.dtype) * (sde.T - eps) + eps
        z = torch.randn_like(batch)
        mean, std = sde.marginal_prob(batch, t)
        score = score_fn(mean + col(std) * z, t)
        if likelihood_weighting:
            g2 = sde.sde(torch.zeros_like(batch), t)[1] ** 2
            return ((score + z / col(std)) ** 2).flatten(1).mean(1).mul(g2).mean()
        return ((score * col(std) + z) ** 2).flatten(1).mean(1).mean()

    @staticmethod
    def ddpm_loss(sde, model, batch):
        """get_ddpm_loss_fn: VPSDE only; x from the cumulative tables at a random index, noise prediction."""
        assert isinstance(sde, sde_lib.VPSDE), "DDPM training only works for VPSDEs."
        labels = torch.randint(0, sde.N, (batch.shape[0],))
        z = torch.randn_like(batch)
        x = col(sde.sqrt_alphas_cumprod[labels]) * batch + col(sde.sqrt_1m_alphas_cumprod[labels]) * z
        return ((model(x, labels) - z) ** 2).flatten(1).mean(1).mean()

    @staticmethod
    def euler_maruyama(sde, score_fn, x, t):
        rsde = sde.reverse(score_fn, False)
        dt = -1.0 / rsde.N
        drift, diffusion = rsde.sde(x, t)
        x_mean = x + drift * dt
        return x_mean + col(diffusion) * math.sqrt(-dt) * torch.randn_like(x), x_mean

    @staticmethod
    def reverse_diffusion(sde, score_fn, x, t, probability_flow=False):
        f, G = sde.reverse(score_fn, probability_flow).discretize(x, t)
        x_mean = x - f
        return x_mean + col(G) * torch.randn_like(x), x_mean

    @staticmethod
    def ancestral(sde, score_fn, x, t):
        """VE: sigma_i, sigma_{i-1} (0 at i = 0) from discrete_sigmas; VP: discrete_betas[i]; else refused."""
        if not isinstance(sde, (sde_lib.VPSDE, sde_lib.VESDE)):
            raise NotImplementedError(f"SDE class {type(sde).__name__} not yet supported.")
        i = (t * (sde.N - 1) / sde.T).long()
        score = score_fn(x, t)
        if isinstance(sde, sde_lib.VESDE):
            sigma = sde.discrete_sigmas[i]
            previous = torch.where(i == 0, torch.zeros_like(t), sde.discrete_sigmas[i - 1])
            x_mean = x + score * col(sigma**2 - previous**2)
            std = torch.sqrt(previous**2 * (sigma**2 - previous**2) / sigma**2)
        else:
            beta = sde.discrete_betas[i]
            x_mean = (x + col(beta) * score) / col(torch.sqrt(1 - beta))
            std = beta.sqrt()
        return x_mean + col(std) * torch.randn_like(x), x_mean

    @staticmethod
    def _alpha(sde, t):
        """Correctors: alphas at floor(t (N - 1) / T) for VP and subVP, 1 for VE."""
        if not isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE, sde_lib.VESDE)):
            raise NotImplementedError(f"SDE class {type(sde).__name__} not yet supported.")
        if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
            return sde.alphas[(t * (sde.N - 1) / sde.T).long()]
        return torch.ones_like(t)

    @staticmethod
    def langevin(sde, score_fn, x, t, snr, n_steps=1):
        alpha = score_sde._alpha(sde, t)
        for _ in range(n_steps):
            grad, noise = score_fn(x, t), torch.randn_like(x)
            ratio = noise.flatten(1).norm(dim=-1).mean() / grad.flatten(1).norm(dim=-1).mean()
            step = 2 * alpha * (snr * ratio) ** 2
            x_mean = x + col(step) * grad
            x = x_mean + col(torch.sqrt(2 * step)) * noise
        return x, x_mean

    @staticmethod
    def ald(sde, score_fn, x, t, snr, n_steps=1):
        alpha = score_sde._alpha(sde, t)
        std = sde.marginal_prob(x, t)[1]
        for _ in range(n_steps):
            step = 2 * alpha * (snr * std) ** 2
            x_mean = x + col(step) * score_fn(x, t)
            x = x_mean + col(torch.sqrt(2 * step)) * torch.randn_like(x)
        return x, x_mean

    @staticmethod
    def pc_sampler(sde, model, shape, predictor, corrector=None, snr=0.16, eps=1e-3, continuous=True):
        """get_pc_sampler: N times linspace(T, eps, N); corrector then predictor at each; returns x_mean."""
        score_fn = score_sde.get_score_fn(sde, model, continuous)
        x = sde.prior_sampling(shape)
        for t in torch.linspace(sde.T, eps, sde.N, dtype=x.dtype):
            vec_t = torch.full(shape[:1], float(t), dtype=x.dtype)
            if corrector is not None:
                x, x_mean = corrector(sde, score_fn, x, vec_t, snr)
            x, x_mean = predictor(sde, score_fn, x, vec_t)
        return x_mean

    @staticmethod
    def ode_sampler(sde, model, z, eps=1e-3, rtol=1e-8, atol=1e-8):
        """get_ode_sampler without denoising: scipy's RK45 on the flow drift rsde.sde from T to eps."""
        score_fn = score_sde.get_score_fn(sde, model)
        rsde = sde.reverse(score_fn, probability_flow=True)

        def ode_func(t, x):
            x = torch.tensor(x, dtype=z.dtype).reshape(z.shape)
            return rsde.sde(x, torch.full(z.shape[:1], t, dtype=z.dtype))[0].flatten().numpy()
        solution = integrate.solve_ivp(ode_func, (sde.T, eps), z.flatten().numpy(), rtol=rtol, atol=atol)
        return torch.tensor(solution.y[:, -1], dtype=z.dtype).reshape(z.shape)


def load(name, dtype=torch.float64, **params):
    return sdelang.load(EXAMPLES / f"{name}.sde", **params).to(dtype)


def exact_model(name, role):
    """A model that is exact under score_sde's scaling for the role: for VP/subVP continuous noise
    prediction eps(x, 999 t) = -std(t) s(x, t); for VE the score itself, labelled by std, which for
    ve.sde is 0.01 * 5000^t."""
    score = exact_score(name)
    if role == "VESDE":
        return lambda x, std: score(x, torch.log(std / 0.01) / math.log(5000))

    def noise(x, labels):
        t = labels / 999
        return -score(x, t) * col(kernel(name, t)[2].sqrt())
    return noise


def test_roles_follow_the_kernel():
    for name, expected in ROLES.items():
        sde = load(name)
        assert scoresde.role(sde) == expected, name
        view = scoresde.adapt(sde, sde_lib=sde_lib)
        assert view.role == expected
        for other in ("VPSDE", "subVPSDE", "VESDE"):
            assert isinstance(view, getattr(sde_lib, other)) == (other == expected), (name, other)
        assert isinstance(view, sde_lib.SDE) and not isinstance(sde, sde_lib.SDE)


def test_other_kinds_are_refused():
    for name in ("cld", "cubic_langevin"):
        with pytest.raises(ValueError, match="scalar Gaussian kernel.*no meaning"):
            scoresde.adapt(sdelang.load(EXAMPLES / f"{name}.sde"), sde_lib=sde_lib)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="discretization must be one of exact, score_sde"):
        scoresde.adapt(load("vp"), discretization="ddpm", sde_lib=sde_lib)
    with pytest.raises(ValueError, match="role is subVPSDE.*use 'exact'"):
        scoresde.adapt(load("ou"), discretization="score_sde", sde_lib=sde_lib)


def test_without_score_sde_no_class_is_registered():
    view = scoresde.adapt(load("vp"))
    assert view.role == "VPSDE" and view.T == 1 and view.N == 1000


@pytest.mark.parametrize("name", SDES + ["vdm"])
def test_exact_tables_are_the_kernel_on_the_grid(name):
    """vdm: m(0) < 1, where the first step, from the data, once took m(t_0) / m(0) as its ratio: both identities
    below were 1 - m(0)^2 off at i = 0 (1.7e-6 here, 4.5e-5 on a logSNR that starts at 10)."""
    view = scoresde.adapt(load(name), sde_lib=sde_lib)
    N, T = view.N, float(view.T)
    t = torch.arange(1, N + 1, dtype=torch.float64) * T / N
    m, c, v = kernel(name, t)
    assert torch.allclose(view.alphas_cumprod, m**2, rtol=1e-10, atol=0)
    assert torch.allclose(torch.cumprod(view.alphas, 0), view.alphas_cumprod, rtol=1e-9, atol=0)
    assert torch.allclose(view.sqrt_1m_alphas_cumprod, v.sqrt(), rtol=1e-10, atol=0)
    assert torch.allclose(view.discrete_sigmas, v.sqrt() / m, rtol=1e-10, atol=0)
    # The step variances rebuild v: v_i = alphas_i v_{i-1} + betas_i from v = 0 before the first step.
    rebuilt, previous = [], 0.0
    for a, b in zip(view.alphas.tolist(), view.discrete_betas.tolist()):
        previous = a * previous + b
        rebuilt.append(previous)
    assert torch.allclose(torch.tensor(rebuilt, dtype=torch.float64), v, rtol=1e-8, atol=1e-14)
    if ROLES[name] == "VPSDE":
        assert torch.allclose(view.alphas + view.discrete_betas, torch.ones(N, dtype=torch.float64), atol=1e-12)


def test_score_sde_tables_are_score_sde_s():
    """discretization="score_sde": DDPM's and NCSN's tables as score_sde builds them for its VP and VE."""
    vp = scoresde.adapt(load("vp"), discretization="score_sde", sde_lib=sde_lib)
    betas = torch.linspace(0.1 / 1000, 20 / 1000, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert torch.allclose(vp.discrete_betas, betas, rtol=1e-13, atol=0)
    assert torch.allclose(vp.alphas, 1 - betas, rtol=1e-13, atol=0)
    assert torch.allclose(vp.alphas_cumprod, alphas_cumprod, rtol=1e-12, atol=0)
    assert torch.allclose(vp.sqrt_alphas_cumprod, alphas_cumprod.sqrt(), rtol=1e-12, atol=0)
    assert torch.allclose(vp.sqrt_1m_alphas_cumprod, torch.sqrt(1 - alphas_cumprod), rtol=1e-10, atol=0)
    ve = scoresde.adapt(load("ve"), discretization="score_sde", sde_lib=sde_lib)
    sigmas = torch.exp(torch.linspace(math.log(0.01), math.log(50), 1000, dtype=torch.float64))
    assert torch.allclose(ve.discrete_sigmas, sigmas, rtol=1e-12, atol=0)


def test_score_sde_tables_refuse_betas_above_one():
    """score_sde's VP step uses sqrt(1 - beta_i) with beta_i = g(t_i)^2 T/N; the cosine schedule's
    g^2(T) = 370 makes beta_i > 1 at N = 200, where that step has no meaning (exact mode has none)."""
    with pytest.raises(ValueError, match="discrete_betas reach 1.8.*'exact' or N >= 369"):
        scoresde.adapt(load("cosine_vp", N=200), discretization="score_sde", sde_lib=sde_lib)
    assert scoresde.adapt(load("cosine_vp", N=200), sde_lib=sde_lib).discrete_betas.max() < 1


def test_score_sde_discretize_is_score_sde_s_step():
    """VP: f = (sqrt(1 - beta_i) - 1) x, G = sqrt(beta_i); VE: f = 0, G^2 = sigma_i^2 - sigma_{i-1}^2
    (sigma_{-1} = 0), i = floor(t (N - 1)), with score_sde's tables built here from its formulas."""
    x = torch.randn(5, *SHAPE, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.1, 0.5, 0.77, 1.0], dtype=torch.float64)
    i = (t * 999).long()
    vp = scoresde.adapt(load("vp"), discretization="score_sde", sde_lib=sde_lib)
    beta = torch.linspace(0.1 / 1000, 20 / 1000, 1000, dtype=torch.float64)[i]
    f, G = vp.discretize(x, t)
    assert torch.allclose(f, col(torch.sqrt(1 - beta) - 1) * x, rtol=1e-12, atol=1e-15)
    assert torch.allclose(G, beta.sqrt(), rtol=1e-12)
    ve = scoresde.adapt(load("ve"), discretization="score_sde", sde_lib=sde_lib)
    sigmas = torch.exp(torch.linspace(math.log(0.01), math.log(50), 1000, dtype=torch.float64))
    previous = torch.where(i == 0, torch.zeros_like(t), sigmas[i - 1])
    f, G = ve.discretize(x, t)
    assert (f == 0).all() and torch.allclose(G, torch.sqrt(sigmas[i] ** 2 - previous**2), rtol=1e-10)


@pytest.mark.parametrize("name", SDES)
def test_exact_discretize_is_the_kernel_step(name):
    """x_t = x_s + f + G z with s = t - T/N: f = (r - 1) x + c_t - r c_s, G^2 = v_t - r^2 v_s, r = m_t/m_s;
    the step into t <= T/N starts from the data (v_s = 0): G^2 = v(t), the VE first-step caveat."""
    view = scoresde.adapt(load(name), sde_lib=sde_lib)
    T, N = float(view.T), view.N
    t = torch.tensor([float(view.eps), 0.3 * T / N, 0.25 * T, 0.6 * T, T], dtype=torch.float64)
    s = (t - T / N).clamp(min=0)
    (m_t, c_t, v_t), (m_s, c_s, v_s) = kernel(name, t), kernel(name, s)
    v_s = torch.where(s > 0, v_s, torch.zeros_like(v_s))
    r = m_t / m_s
    x = torch.randn(5, *SHAPE, dtype=torch.float64)
    f, G = view.discretize(x, t)
    assert torch.allclose(f, col(r - 1) * x + col(c_t - r * c_s), rtol=1e-9, atol=1e-13)
    assert torch.allclose(G**2, v_t - r**2 * v_s, rtol=1e-8, atol=1e-16)


def test_ve_first_step_removes_the_noise_at_eps():
    """The module's own discretize steps from x(0) = data + N(0, sigma_min^2): G = 1.3e-4 at eps. The
    view's steps from the data: G = std(eps), so score_sde's last denoising step is Tweedie's."""
    sde = load("ve")
    t = torch.full((1,), 1e-5, dtype=torch.float64)
    x = torch.zeros(1, *SHAPE, dtype=torch.float64)
    assert sde.discretize(x, t)[1].item() == pytest.approx(1.3e-4, rel=0.05)
    assert scoresde.adapt(sde).discretize(x, t)[1].item() == pytest.approx(sde.std(t).item(), rel=1e-12)


@pytest.mark.parametrize("name", SDES)
def test_get_score_fn_gives_the_score(name):
    """score_sde's scaling on the view's branch turns a model trained the way score_sde trains for that
    class (noise for VP/subVP, the score for VE) into the exact score."""
    sde = load(name)
    view = scoresde.adapt(sde, sde_lib=sde_lib)
    t = torch.linspace(float(sde.eps), float(sde.T), 6, dtype=torch.float64)
    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    got = score_sde.get_score_fn(view, exact_model(name, view.role))(x, t)
    assert torch.allclose(got, exact_score(name)(x, t), rtol=1e-10, atol=1e-12)


def test_unregistered_module_is_rejected_as_score_sde_does():
    with pytest.raises(NotImplementedError, match="not yet supported"):
        score_sde.get_score_fn(load("vp"), lambda x, t: x)


def expected_dsm_loss(name, eps=1e-5):
    """E over t ~ U(eps, T), x0, z of |std s + z|^2 per dimension with the exact marginal score:
    1 - v / (m^2 s^2 + v) (the irreducible part of denoising score matching), by quadrature."""
    T = float(load(name).T)

    def integrand(t):
        m, c, v = (q.item() for q in kernel(name, torch.tensor([t], dtype=torch.float64)))
        return 1 - v / (m**2 * 0.25 + v)
    return integrate.quad(integrand, eps, T, limit=200, points=[eps * 10, T / 100])[0] / (T - eps)


@pytest.mark.parametrize("name", SDES)
def test_sde_loss_of_the_exact_score(name):
    """get_sde_loss_fn through the view, with the exact model, averages to the quadrature value within
    5 Monte Carlo standard errors (estimated from 20 batches of 4000)."""
    sde = load(name)
    view = scoresde.adapt(sde, sde_lib=sde_lib)
    model = exact_model(name, view.role)
    torch.manual_seed(0)
    losses = torch.tensor([score_sde.sde_loss(view, model, 0.3 + 0.5 * torch.randn(4000, *SHAPE,
                                                                                   dtype=torch.float64))
                           for _ in range(20)])
    expected = expected_dsm_loss(name)
    assert abs(losses.mean().item() - expected) < 5 * losses.std().item() / math.sqrt(20) + 1e-6, \
        (losses.mean().item(), expected)


def moments_ok(x, std_data=0.5, mean=0.3, bias=0.0):
    """Mean and std of n draws within 5 Monte Carlo standard errors plus the sampler's bias."""
    n = x.numel()
    return (abs(x.mean().item() - mean) < 5 * std_data / math.sqrt(n) + bias
            and abs(x.std().item() - std_data) < 5 * std_data / math.sqrt(2 * n) + bias)


@pytest.mark.parametrize("name", SDES)
def test_pc_sampler_reaches_the_data(name):
    """Reverse-diffusion predictor + Langevin corrector (snr 0.16, score_sde's default) with the exact
    score, 200 steps: 4000 draws match N(0.3, 0.25) within 5 standard errors + 0.02 (discretisation)."""
    sde = load(name, N=200)
    view = scoresde.adapt(sde, sde_lib=sde_lib)
    torch.manual_seed(0)
    x = score_sde.pc_sampler(view, exact_model(name, view.role), (4000, *SHAPE), score_sde.reverse_diffusion, score_sde.langevin,
                             eps=float(sde.eps))
    assert moments_ok(x, bias=0.02), (x.mean().item(), x.std().item())


@pytest.mark.parametrize("name, discretization", [("vp", "exact"), ("vp", "score_sde"), ("ve", "exact"),
                                                  ("ve", "score_sde"), ("cosine_vp", "exact")])
def test_ancestral_predictor_reaches_the_data(name, discretization):
    """score_sde's ancestral predictor (DDPM / NCSN posterior steps from the tables), 200 steps, exact
    score: 4000 draws match N(0.3, 0.25) within 5 standard errors + 0.02 (discretisation)."""
    sde = load(name, N=200)
    view = scoresde.adapt(sde, discretization=discretization, sde_lib=sde_lib)
    torch.manual_seed(1)
    x = score_sde.pc_sampler(view, exact_model(name, view.role), (4000, *SHAPE), score_sde.ancestral, eps=float(sde.eps))
    assert moments_ok(x, bias=0.02), (x.mean().item(), x.std().item())


@pytest.mark.parametrize("name", ["subvp", "ou"])
def test_ancestral_predictor_is_refused_for_other_sdes_as_score_sde_does(name):
    view = scoresde.adapt(load(name), sde_lib=sde_lib)
    with pytest.raises(NotImplementedError):
        score_sde.ancestral(view, None, torch.zeros(1, *SHAPE), torch.ones(1))


@pytest.mark.parametrize("name", ["subvp", "ou", "vp"])
def test_annealed_langevin_corrector_reads_alphas(name):
    sde = load(name, N=200)
    view = scoresde.adapt(sde, sde_lib=sde_lib)
    torch.manual_seed(2)
    x = score_sde.pc_sampler(view, exact_model(name, "VPSDE"), (4000, *SHAPE), score_sde.reverse_diffusion,
                             score_sde.ald, snr=0.16, eps=float(sde.eps))
    assert moments_ok(x, bias=0.02), (x.mean().item(), x.std().item())


def test_euler_maruyama_covers_the_whole_interval_when_T_is_not_1():
    """OU has T = 5. score_sde's EM predictor steps dt = -1 / rsde.N; the view's reverse reports N / T, so
    the steps add up to T - eps and the samples reach the data. On the bare module they cover a fifth."""
    sde = load("ou", N=250)
    view = scoresde.adapt(sde, sde_lib=sde_lib)
    torch.manual_seed(3)
    x = score_sde.pc_sampler(view, exact_model("ou", "VPSDE"), (4000, *SHAPE), score_sde.euler_maruyama,
                             eps=float(sde.eps))
    assert moments_ok(x, bias=0.03), (x.mean().item(), x.std().item())
    rsde = sde.reverse(exact_score("ou"))
    assert rsde.N == 250 and view.reverse(exact_score("ou")).N == 50


@pytest.mark.parametrize("name", SDES)
def test_ode_sampler_is_the_exact_flow_map(name):
    """The flow ODE through the view, solved as score_sde's ODE sampler does (RK45, here rtol = atol =
    1e-8), lands on the exact flow map from T to eps to 1e-5."""
    sde = load(name)
    view = scoresde.adapt(sde, sde_lib=sde_lib)
    T, eps = float(sde.T), float(sde.eps)
    mean_T, var_T = marginal(name, torch.tensor([T], dtype=torch.float64))
    z = mean_T + var_T.sqrt() * torch.randn(8, *SHAPE, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(4))
    x = score_sde.ode_sampler(view, exact_model(name, view.role), z, eps=eps)
    assert torch.allclose(x, exact_flow(name, z, T, eps), rtol=1e-5, atol=1e-5)


def test_ddpm_loss_reads_the_cumulative_tables():
    """DDPM's loss (VPSDE only) perturbs with sqrt_alphas_cumprod and sqrt_1m_alphas_cumprod at a random
    index; with the exact noise model at those grid times its mean is the quadrature value on the grid."""
    sde = load("vp", N=100)
    view = scoresde.adapt(sde, sde_lib=sde_lib)
    t_grid = torch.arange(1, 101, dtype=torch.float64) / 100
    model = lambda x, labels: exact_model("vp", "VPSDE")(x, 999 * t_grid[labels])  # noqa: E731
    torch.manual_seed(5)
    losses = torch.tensor([score_sde.ddpm_loss(view, model, 0.3 + 0.5 * torch.randn(4000, *SHAPE,
                                                                                    dtype=torch.float64))
                           for _ in range(20)])
    m, _, v = kernel("vp", t_grid)
    expected = (1 - v / (m**2 * 0.25 + v)).mean().item()
    assert abs(losses.mean().item() - expected) < 5 * losses.std().item() / math.sqrt(20)
    with pytest.raises(AssertionError, match="only works for VPSDEs"):
        score_sde.ddpm_loss(scoresde.adapt(load("subvp"), sde_lib=sde_lib), model, torch.zeros(2, *SHAPE))


def test_tables_follow_the_module_dtype():
    view = scoresde.adapt(load("vp", torch.float32), sde_lib=sde_lib)
    assert all(getattr(view, name).dtype == torch.float32 for name in scoresde.TABLES)
    moved = view.to(torch.float64)
    assert moved is view and view.module._anchor.dtype == torch.float64
    assert all(getattr(view, name).dtype == torch.float64 for name in scoresde.TABLES)
    assert np.isfinite(view.discrete_sigmas.numpy()).all()
