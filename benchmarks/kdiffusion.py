"""sdelang's few-step samplers next to k-diffusion's own, on the same compiled SDEs, data and exact scores.

k-diffusion (installed from the package index, `pip install --no-deps k-diffusion torchsde`; docs/interop.md)
runs on a compiled affine SDE through sdelang.interop.kdiffusion: sigma_k = exp(-logSNR / 2),
x_k = (x - c) / m, the denoiser D = (x - c + v s) / m. Both start from the same draws of p_T and stop at
eps (k-diffusion's last sigma is sigma_k(eps), not 0), with the exact score of

- gaussian: N((1, -0.5), 0.5^2 I) in d = 2, whose flow map is known in closed form;
- mixture:  four Gaussians of std 0.2 at (+-1, +-1) (weights 0.4, 0.3, 0.2, 0.1), whose score under any
            affine kernel is the responsibility-weighted sum of the components' scores; its flow map is
            the flow ODE solved by dopri8 at rtol = atol = 1e-11 (checked against the closed form on
            the Gaussian, where it agrees to 1e-9).

Error: RMS distance to the exact flow map at eps / the data's RMS std, 500 samples, float64, at 5, 10, 20
and 50 score evaluations (NFE; samplers with two evaluations per step get half the steps). k-diffusion's
deterministic samplers run on its three sigma schedules (logsnr = its "exponential", time = the sigmas of
a uniform-t grid, karras = rho 7) and the best schedule is shown; dpmpp_3m_sde runs with eta = 0 (its
deterministic 3M), dpm_fast takes the NFE as its budget. sdelang's run at their defaults (the grid of
sampling.default_spacing: logsnr, edm for deis, floored for unipc, unipc_3m, lms and dpmpp_3m_published) and
on the other grids; a cell shows the default's error and, where another grid did better, that error and grid.
The last rows compare the best of each library over its grids and samplers, and the same without sdelang's
lms and dpmpp_3m_published, which are k-diffusion's lms and dpmpp_3m_sde (eta = 0) run by sdelang.
Best-of-grids picks up accidental cancellations too (an error that changes sign between grids), which is
why a few cells fall far below their neighbours.

    python benchmarks/kdiffusion.py [--sdes vp ve ...] [--data gaussian mixture]
"""
from __future__ import annotations

import argparse
import math

import torch

import sdelang
from sdelang.interop.kdiffusion import Denoiser, get_sigmas, k_diffusion_sampling
from sdelang.runtime import sampling
from sdelang.runtime.gaussian import GaussianData
from sdelang.runtime.ode import solve

NFES = (5, 10, 20, 50)
SDES = ("vp", "ve", "subvp", "cosine_vp", "ou", "edm_ve")
OURS = ("dpmpp_2m", "dpmpp_3m", "dpmpp_3m_published", "unipc", "unipc_3m", "deis", "lms")
# sdelang's own implementations of two of k-diffusion's samplers (lms; dpmpp_3m_sde at eta = 0): on the
# same grid they give k-diffusion's numbers, so a second ratio row leaves them out.
SAME_AS_THEIRS = ("dpmpp_3m_published", "lms")
# k-diffusion sampler -> score evaluations per step.
THEIRS = {"euler": 1, "heun": 2, "dpm_2": 2, "lms": 1, "dpmpp_2m": 1, "dpmpp_3m_sde": 1, "dpm_fast": None}
N = 500


class Mixture:
    """sum_k w_k N(mu_k, s_k^2 I) diffused by an affine SDE: p_t = sum_k w_k N(m mu_k + c, (m^2 s_k^2 + v) I)."""

    def __init__(self, sde, means, stds, weights):
        self.sde = sde
        self.means = torch.tensor(means, dtype=torch.float64)               # [K, d]
        self.stds = torch.tensor(stds, dtype=torch.float64)                 # [K]
        self.log_weights = torch.tensor(weights, dtype=torch.float64).log()
        mean = (self.log_weights.exp()[:, None] * self.means).sum(0)
        second = (self.log_weights.exp() * (self.stds**2 * self.means.shape[1]
                                            + self.means.pow(2).sum(1))).sum()
        self.rms_std = math.sqrt((second - mean.pow(2).sum()) / self.means.shape[1])

    def score(self, x, t):
        m, c, v = self.sde.mean_coeff(t)[:, None], self.sde.mean_offset(t)[:, None], self.sde.std(t)[:, None] ** 2
        var = m**2 * self.stds**2 + v                                             # [B, K]
        diff = x[:, None, :] - (m[:, :, None] * self.means + c[:, :, None])        # [B, K, d]
        d = x.shape[1]
        log_r = self.log_weights - 0.5 * diff.pow(2).sum(2) / var - 0.5 * d * var.log()
        r = torch.softmax(log_r, 1)
        return -(r[:, :, None] * diff / var[:, :, None]).sum(1)

    def sample_T(self, n, generator):
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        T = torch.full((n,), float(self.sde.T), dtype=torch.float64)
        m, c, v = self.sde.mean_coeff(T)[:, None], self.sde.mean_offset(T)[:, None], self.sde.std(T)[:, None] ** 2
        return m * self.means[k] + c + (m**2 * self.stds[k, None] ** 2 + v).sqrt() * z


def reference_flow(sde, score, x_T):
    flow = sde.reverse(score, probability_flow=True)
    times = torch.tensor([float(sde.T), float(sde.eps)], dtype=torch.float64)
    batch = x_T.shape[:1]
    return solve(lambda t, y: flow.sde(y, t.expand(batch))[0], x_T, times, rtol=1e-11, atol=1e-11,
                 method="dopri8")[-1]


def gaussian_flow(data, x_T):
    sde, n = data.sde, x_T.shape[0]
    mean_T, var_T = data._moments(torch.full((n,), float(sde.T), dtype=x_T.dtype), x_T)
    mean_e, var_e = data._moments(torch.full((n,), float(sde.eps), dtype=x_T.dtype), x_T)
    return mean_e + (var_e / var_T).sqrt() * (x_T - mean_T)


def theirs(K, sde, score, x_T, name, nfe):
    """Error of k-diffusion's `name` at an NFE budget, best over its sigma schedules, and that schedule."""
    denoiser = Denoiser(sde, score)
    n = x_T.shape[0]
    x_k, _ = denoiser.from_sde(x_T, torch.full((n,), float(sde.T), dtype=torch.float64))
    results = []
    for spacing in ("logsnr", "time", "karras"):
        if name == "dpm_fast":
            lo, hi = get_sigmas(sde, 2, "logsnr", append_zero=False, dtype=torch.float64)[[1, 0]].tolist()
            out = K.sample_dpm_fast(denoiser, x_k.clone(), lo, hi, nfe, disable=True)
            sigma_end = torch.tensor(lo, dtype=torch.float64)
        else:
            steps = nfe // THEIRS[name]
            if steps < 1 or (name in ("lms", "dpmpp_2m", "dpmpp_3m_sde") and steps < 2):
                return None
            sigmas = get_sigmas(sde, steps + 1, spacing, append_zero=False, dtype=torch.float64)
            options = {"eta": 0.0} if name == "dpmpp_3m_sde" else {}
            out = getattr(K, f"sample_{name}")(denoiser, x_k.clone(), sigmas, disable=True, **options)
            sigma_end = sigmas[-1]
        x, _ = denoiser.to_sde(out, sigma_end.expand(n))
        results.append((x, spacing))
        if name == "dpm_fast":
            break
    return results


def table(name, data_name, K):
    sde = sdelang.load(f"examples/{name}.sde").double()
    generator = torch.Generator().manual_seed(0)
    if data_name == "gaussian":
        data = GaussianData(sde, torch.tensor((1.0, -0.5)), 0.5, (2,))
        x_T = data.sample(N, t=float(sde.T), generator=generator)
        exact, scale, score = gaussian_flow(data, x_T), 0.5, data.score
        check = (reference_flow(sde, score, x_T) - exact).pow(2).mean().sqrt().item() / scale
    else:
        data = Mixture(sde, [(1, 1), (-1, 1), (1, -1), (-1, -1)], [0.2] * 4, [0.4, 0.3, 0.2, 0.1])
        x_T = data.sample_T(N, generator)
        exact, scale, score = reference_flow(sde, data.score, x_T), data.rms_std, data.score
        check = None

    def error(x):
        return (x - exact).pow(2).mean().sqrt().item() / scale

    print(f"\n### {name}, {data_name}" + (f" (dopri8 reference vs closed form: {check:.0e})" if check is not None
                                           else "") + "\n")
    print("| sampler | " + " | ".join(f"NFE {b}" for b in NFES) + " |")
    print("|---|" + "---:|" * len(NFES))
    best_theirs = {b: math.inf for b in NFES}
    best_ours = {b: math.inf for b in NFES}
    best_others = {b: math.inf for b in NFES}
    for method in OURS:
        cells = []
        for nfe in NFES:
            errors = {}
            for spacing in sampling.SPACINGS:
                out = sampling.sample(sde, score, x_T.shape, method, nfe, x_T=x_T, denoise=False, spacing=spacing)
                errors[spacing] = error(out.x)
            best_ours[nfe] = min(best_ours[nfe], *errors.values())
            if method not in SAME_AS_THEIRS:
                best_others[nfe] = min(best_others[nfe], *errors.values())
            best, default = min(errors, key=errors.get), sampling.default_spacing(method)
            cells.append(f"{errors[default]:.1e}" + ("" if best == default else f", {errors[best]:.1e} ({best})"))
        print(f"| sdelang {method} | " + " | ".join(cells) + " |")
    for method in THEIRS:
        cells = []
        for nfe in NFES:
            runs = theirs(K, sde, score, x_T, method, nfe)
            if not runs:
                cells.append("–")
                continue
            e, spacing = min((error(x), spacing) for x, spacing in runs)
            best_theirs[nfe] = min(best_theirs[nfe], e)
            cells.append(f"{e:.1e} ({spacing})")
        print(f"| k-diffusion {method} | " + " | ".join(cells) + " |")
    for label, best in (("best sdelang", best_ours), ("best sdelang but lms, dpmpp_3m_published", best_others)):
        ratio = " | ".join(f"{best[b] / best_theirs[b]:.2f}" for b in NFES)
        print(f"| {label} / best k-diffusion | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdes", nargs="*", default=list(SDES))
    parser.add_argument("--data", nargs="*", default=["gaussian", "mixture"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    K = k_diffusion_sampling()
    print(f"torch {torch.__version__}, float64, 1 thread, {N} samples")
    for data_name in args.data:
        for name in args.sdes:
            table(name, data_name, K)


if __name__ == "__main__":
    main()
