"""Importance sampling of t: variance of the likelihood-weighted denoising loss, uniform vs importance t.

With lambda = g^2 (likelihood weighting) the per-sample loss of sdelang.runtime.losses.denoising_loss is

    L = w(t) * 1/2 |eps_theta(x_t, t) - z|^2,    w(t) = lambda(t) / (q(t) sigma(t)^2),    t ~ q,

an unbiased estimate of J(theta; g^2) for either sampler: q = 1 / (T - eps) (`t ~ uniform`) or
q = lambda / (Z sigma^2) (`t ~ importance`), where w is the constant Z = logSNR(eps) - logSNR(T).
The SDEs are examples/vp.sde and examples/subvp.sde (beta 0.1..20) with their `t in`, `weighting` and
`t ~` lines (where present) replaced by `t in [1e-5, 1]`, `weighting likelihood` and `t ~ uniform` or
`t ~ importance`.

Two measurements, by Monte Carlo with fixed seeds (the tables give the draws), in float64:

(a) the time weight w(t), t ~ q, alone: its mean and squared coefficient of variation
    CV^2 = Var w / (E w)^2, by Monte Carlo and exactly, E_q[w^k] = int_eps^T q w^k dt by adaptive
    quadrature in log t (MATH.md section 3: VP uniform E = 23.9, CV^2 = 177; importance: CV^2 = 0).
(b) the per-sample loss L with a fixed model, for data N(0.5, 0.5^2 I) in d dimensions:
    - the exact score of the data (GaussianData), for which eps_theta - z is N(0, r(t) I) with
      r = m^2 s^2 / (m^2 s^2 + v), s the data's std, so |eps_theta - z|^2 = r chi^2_d and exactly
          E L = d/2 int q w r dt,    E L^2 = d (d + 2) / 4 int q w^2 r^2 dt;
    - an MLP score model from sdelang.runtime.models.build_model with random weights (Monte Carlo only).
    Printed: the mean under each sampler with its standard error and their difference in standard
    errors (the two must agree: both estimate J), the variances, and the variance ratio
    uniform / importance. Under uniform t the weight grows like 1/t near eps, so the loss has finite
    variance but a heavy tail (E L^4 ~ 1/eps^3): its Monte Carlo variance converges slowly, which is
    why the exact values are shown where they are known.

    python benchmarks/importance.py [--samples 524288] [--mlp-samples 262144]
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import scipy.integrate
import torch

import sdelang
from sdelang.runtime.config import ModelConfig
from sdelang.runtime.gaussian import GaussianData
from sdelang.runtime.losses import denoising_loss, time_weight
from sdelang.runtime.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("uniform", "importance")
DATA_MEAN, DATA_STD = 0.5, 0.5
CHUNK = 2**16  # rows per call: bounds memory at d = 64
SEED = 0


def likelihood_sde(name: str, sampler: str):
    """examples/<name>.sde with lambda = g^2, t in [1e-5, 1] and the given time sampler, in float64."""
    text = (ROOT / "examples" / f"{name}.sde").read_text(encoding="utf-8")
    text = re.sub(r"^(t in|weighting|t ~).*\n", "", text, flags=re.M)
    return sdelang.load(text + f"t in [1e-5, 1]\nweighting likelihood\nt ~ {sampler}\n").double()


def integral(sde, integrand) -> float:
    """int_eps^T integrand(t) dt, integrand a torch function of t [1] -> [1], substituting t = e^u:
    the time weight grows like 1/t near eps, which e^u flattens."""
    def in_log_time(u: float) -> float:
        t = torch.tensor([math.exp(u)], dtype=torch.float64)
        return float(integrand(t)[0]) * math.exp(u)
    value, _ = scipy.integrate.quad(in_log_time, math.log(sde.eps), math.log(sde.T), epsrel=1e-10, limit=200)
    return value


def exact_noise(data: GaussianData):
    """eps_theta(x, t) = -sigma(t) s(x, t), s the exact score of `data`, with the signature
    model(x, t, noise=True) under which denoising_loss calls a model."""
    def model(x, t, noise):
        return -data.sde._expand(data.sde.std(t), x) * data.score(x, t)
    return model


def moments(values: torch.Tensor) -> tuple[float, float, float]:
    """Sample mean, its standard error, and the sample variance."""
    var = float(values.var())
    return float(values.mean()), math.sqrt(var / values.numel()), var


def weight_row(name: str, sampler: str, n: int) -> str:
    """(a): w(t) for t ~ q, by Monte Carlo and by quadrature."""
    sde = likelihood_sde(name, sampler)
    w = time_weight(sde, sde.sample_t(n, generator=torch.Generator().manual_seed(SEED)))
    mean, stderr, var = moments(w)
    exact = [integral(sde, lambda t, k=k: sde.t_density(t) * time_weight(sde, t) ** k) for k in (1, 2)]
    exact_cv2 = max(exact[1] / exact[0] ** 2 - 1, 0.0)  # 0 up to rounding under importance sampling
    return (f"| {name} | {sampler} | {mean:.3f} ± {stderr:.3f} | {exact[0]:.3f} | {var / mean**2:.3g} | "
            f"{exact_cv2:.3g} |")


def losses(sde, model, data: GaussianData, n: int) -> torch.Tensor:
    """n per-sample losses L, x0 ~ data, in chunks; one seeded generator for x0, t and z."""
    generator = torch.Generator().manual_seed(SEED)
    out = []
    with torch.no_grad():
        for start in range(0, n, CHUNK):
            x0 = data.sample(min(CHUNK, n - start), generator=generator)
            out.append(denoising_loss(sde, model, x0, generator=generator, reduction="sum"))
    return torch.cat(out)


def exact_loss_moments(sde, d: int) -> tuple[float, float]:
    """E L and Var L for the exact score of N(mu, s^2 I): |eps_theta - z|^2 = r chi^2_d (see the top)."""
    def r(t):
        m2s2 = sde.mean_coeff(t) ** 2 * DATA_STD**2
        return m2s2 / (m2s2 + sde.std(t) ** 2)

    first = d / 2 * integral(sde, lambda t: sde.t_density(t) * time_weight(sde, t) * r(t))
    second = d * (d + 2) / 4 * integral(sde, lambda t: sde.t_density(t) * time_weight(sde, t) ** 2 * r(t) ** 2)
    return first, second - first**2


def loss_row(name: str, model_name: str, d: int, n: int) -> str:
    """(b): mean and variance of L under both samplers, for one fixed model."""
    sdes = {sampler: likelihood_sde(name, sampler) for sampler in SAMPLERS}
    data = GaussianData(sdes["uniform"], DATA_MEAN, DATA_STD, (d,))
    if model_name == "exact score":
        model = exact_noise(data)
    else:
        torch.manual_seed(SEED)
        # Both samplers share the kernel, so one model (built on either SDE) serves both.
        model = build_model(sdes["uniform"], (d,), ModelConfig(width=64, depth=2, embedding=16,
                                                               data_std=DATA_STD)).double().eval()
    stats = {sampler: moments(losses(sde, model, data, n)) for sampler, sde in sdes.items()}
    (mean_u, se_u, var_u), (mean_i, se_i, var_i) = stats["uniform"], stats["importance"]
    gap = (mean_u - mean_i) / math.hypot(se_u, se_i)
    exact_mean = exact_u = exact_i = exact_ratio = "-"
    if model_name == "exact score":
        mean, var_exact_u = exact_loss_moments(sdes["uniform"], d)
        _, var_exact_i = exact_loss_moments(sdes["importance"], d)
        exact_mean, exact_u, exact_i = f"{mean:.4g}", f"{var_exact_u:.4g}", f"{var_exact_i:.4g}"
        exact_ratio = f"{var_exact_u / var_exact_i:.3g}"
    return (f"| {name} | {model_name} | {d} | {n} | {mean_u:.4g} ± {se_u:.2g} | {mean_i:.4g} ± {se_i:.2g} | "
            f"{gap:+.2f} | {exact_mean} | {var_u:.4g} | {exact_u} | {var_i:.4g} | {exact_i} | "
            f"{var_u / var_i:.3g} | {exact_ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2**19, help="draws per estimate (weights, exact score)")
    parser.add_argument("--mlp-samples", type=int, default=2**18, help="draws per estimate with the MLP")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"Likelihood weighting lambda = g^2, beta 0.1..20, t in [1e-5, 1], float64, seed {SEED}.\n")
    print(f"(a) Time weight w = lambda / (q sigma^2), t ~ q; {args.samples} draws. "
          "Exact: quadrature of int q w^k dt.\n")
    print("| SDE | t sampler | E w (MC ± se) | E w exact | CV² (MC) | CV² exact |")
    print("|---|---|---:|---:|---:|---:|")
    for name in ("vp", "subvp"):
        for sampler in SAMPLERS:
            print(weight_row(name, sampler, args.samples))

    print(f"\n(b) Per-sample loss L = w 1/2 |eps_theta - z|^2 (reduction sum), data N({DATA_MEAN}, {DATA_STD}^2 I). "
          "Exact: the chi-square moments of the exact score (see the top of this file).\n")
    print("| SDE | model | d | draws | mean, uniform t | mean, importance t | difference / se | exact mean | "
          "Var L, uniform | exact | Var L, importance | exact | variance ratio | exact |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("vp", "subvp"):
        # d = 64 draws 32 times the normals per sample: fewer samples keep the run short.
        for model_name, d, n in (("exact score", 2, args.samples), ("exact score", 64, args.samples // 8),
                                 ("MLP 2x64, random", 2, args.mlp_samples)):
            print(loss_row(name, model_name, d, n))
    print("\nse: standard error of the mean. difference / se: (mean uniform - mean importance) / "
          "sqrt(se_u^2 + se_i^2), about N(0, 1) when both estimate the same J. variance ratio: Var L uniform / "
          "Var L importance, the factor by which importance sampling cuts the draws needed for a given error. "
          "Monte Carlo variances under uniform t are heavy-tailed estimates (see the top of this file): the "
          "exact columns are the reference.")


if __name__ == "__main__":
    main()
