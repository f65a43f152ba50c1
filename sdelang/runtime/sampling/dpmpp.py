"""Multistep exponential integrators in data-prediction form for any affine SDE (MATH.md section 9).

With y = x - c(t), lambda = log(m / sigma) = logSNR / 2 and the data prediction
x0_hat(x, t) = (y + v s(x, t)) / m, the flow ODE (eta = 0) and the reverse SDE (eta = 1) from s to t < s,
h = lambda_t - lambda_s > 0, have the exact solutions

    y_t = (sigma_t / sigma_s) e^{-eta h} y_s + m_t int_{-h}^0 (1 + eta) e^{(1 + eta) u} x0_hat(lambda_t + u) du
          [ + sigma_t sqrt(1 - e^{-2 eta h}) z ]

(u = lambda - lambda_t; the linear part is exact, whatever the SDE's m, c, v). The solvers replace
x0_hat(lambda) by the polynomial through the last p data predictions (nodes in lambda) and integrate it
exactly: y_t = ratio y_s + m_t sum_j w_j x0_hat_j, with weights from the integrals
J_k = int_{-h}^0 a e^{a u} u^k du = a^-k (-1)^k gamma(k + 1, a h) (lower incomplete gamma, a = 1 + eta),
exact for every h (no 1 - e^{-h} cancellation). That is DPM-Solver++ (Lu et al. 2022) in its exact
(Taylor-free) multistep form: p = 1 is DDIM, p = 2 "2M", p = 3 "3M", each of global order p; eta = 1
gives DPM-Solver++ SDE. The UniPC-style corrector (Zhao et al. 2023) refits the polynomial of the step
just taken through the new evaluation as well, p + 1 nodes, at no extra NFE: the corrected state is used
from then on while the history keeps the evaluation at the predicted one, as UniC does.

The first steps run at lower order (warm-up: step i uses min(order, i + 1) nodes), and with fewer than
LOWER_ORDER_FINAL steps the last ones too (step i uses at most steps - i nodes), as DPM-Solver does:
extrapolating a polynomial over a long last step from far-away nodes is what few-step grids get wrong.
All weights are computed in float64 before the loop, so the loop makes no host-device synchronisation.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .common import Samples, check_choice, check_count, check_positive, fixed_step, noise, run, schedule

VARIABLES = ("lambda", "sigma")
FORMS = ("exact", "published")
# Below this many steps the last steps lower their order (DPM-Solver's lower_order_final).
LOWER_ORDER_FINAL = 10


# Gauss-Legendre nodes and weights on [-1, 0] for the step integrals: the integrands are entire
# functions of u, and 32 nodes integrate them to rounding error for steps up to h = 10 in lambda.
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(32)
_NODES, _WEIGHTS = (_NODES - 1) / 2, _WEIGHTS / 2


def _weights(nodes: list[float], h: float, a: float, variable: str) -> np.ndarray:
    """w_j = int_{-h}^0 a e^{a u} L_j du, L_j the Lagrange basis of the nodes (u-positions) as a polynomial
    in u (variable "lambda") or in sigma / sigma_t = e^{-u} ("sigma"), by quadrature of the product form of
    L_j (no monomial expansion, so no cancellation when the nodes are close)."""
    u = h * _NODES
    kernel = h * _WEIGHTS * a * np.exp(a * u)
    warp = (lambda v: v) if variable == "lambda" else (lambda v: np.expm1(-np.asarray(v, dtype=np.float64)))
    x, points = warp(u), [float(warp(n)) for n in nodes]
    weights = []
    for j, node in enumerate(points):
        basis = np.ones_like(u)
        for i, other in enumerate(points):
            if i != j:
                basis = basis * (x - other) / (node - other)
        weights.append(float(kernel @ basis))
    return np.array(weights)


def _published_2m(nodes: list[float], h: float, a: float) -> np.ndarray:
    """DPM-Solver++(2M)'s own weights for the nodes -h and -h - h_prev: (1 - e^{-a h}) times
    (1 + 1 / (2 r), -1 / (2 r)), r = h_prev / h (a first-order integral of a midpoint extrapolation)."""
    r = (nodes[0] - nodes[1]) / h
    phi = -math.expm1(-a * h)
    return np.array([phi * (1 + 1 / (2 * r)), -phi / (2 * r)])


def plan(lam: np.ndarray, order: int, eta: float, corrector: bool, variable: str, form: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Predictor and corrector weights, [steps, order] and [steps, order + 1] (zero-padded).

    Step i goes from lam[i] to lam[i + 1]; predictor node j is lam[i - j]; corrector node 0 is
    lam[i + 1] (the new evaluation) and node j + 1 is lam[i - j]. Row i of the corrector weights redoes
    step i once x0_hat at lam[i + 1] is known (unused for the last step, which has no evaluation after it).
    """
    steps = len(lam) - 1
    a = 1.0 + eta
    predictor, correct = np.zeros((steps, order)), np.zeros((steps, order + 1))
    for i in range(steps):
        p = min(order, i + 1)
        if steps < LOWER_ORDER_FINAL:
            p = min(p, steps - i)
        h = lam[i + 1] - lam[i]
        past = [lam[i - j] - lam[i + 1] for j in range(p)]
        use_published = form == "published" and p == 2
        predictor[i, :p] = _published_2m(past, h, a) if use_published else _weights(past, h, a, variable)
        if corrector:
            correct[i, : p + 1] = _weights([0.0] + past, h, a, variable)
    return predictor, correct


def multistep(sde, score_fn, shape, steps, *, order=2, corrector=False, eta=0.0, spacing="logsnr", variable="lambda",
              form="exact",
              generator=None, denoise=True, progress=False, x_T=None, after_step=None) -> Samples:
    """DPM-Solver++ pM (order p = 1, 2, 3) on y = x - c(t), with the UniPC-style corrector if asked and
    the reverse SDE's noise if eta > 0 (see the module docstring). form="published" takes DPM-Solver++(2M)'s
    own weights for the two-node steps instead of the exact integral of the line through the nodes (same
    order; it extrapolates less over long steps, which measured better at 10-50 NFE). NFE: steps (+1)."""
    order = check_count("order", order, 1)
    if order > 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    check_choice("variable", variable, VARIABLES)
    check_choice("form", form, FORMS)
    if eta != 0:
        check_positive("eta", eta)
    if corrector and eta != 0:
        raise ValueError("the corrector is for the flow ODE (eta = 0): a stochastic step has no polynomial to refit")
    what = f"dpmpp_{order}m" + ("_sde" if eta else "") + (" with a corrector" if corrector else "")
    steps, score, x, grid, denoise = fixed_step(sde, score_fn, shape, steps, generator, x_T, what=what,
                                                kernel=True, denoise=denoise, spacing=spacing)
    k64 = schedule(sde, grid, grid)
    lam64 = k64.log_snr / 2
    pred, corr = plan(lam64.cpu().numpy(), order, float(eta), corrector, variable, form)
    h = lam64[1:] - lam64[:-1]
    sigma64 = k64.v.sqrt()
    ratio = (sigma64[1:] / sigma64[:-1] * torch.exp(-eta * h)).to(x.dtype)
    spread = (sigma64[1:] * torch.sqrt(-torch.expm1(-2 * eta * h))).to(x.dtype)
    pred, corr = (torch.as_tensor(w, dtype=x.dtype, device=x.device) for w in (pred, corr))
    k = schedule(sde, grid, x)
    history: list[torch.Tensor] = []  # x0_hat at lam[i], lam[i - 1], ...
    y_before: list[torch.Tensor] = []  # y at the start of the last step, for the corrector

    def step(x, i, t, t_next):
        x0 = (x - k.c[i] + k.v[i] * score(x, t)) / k.m[i]
        if corrector and i > 0:
            nodes = [x0] + history
            y = ratio[i - 1] * y_before[0] + k.m[i] * sum(corr[i - 1, j] * d for j, d in enumerate(nodes))
            x = y + k.c[i]
        history.insert(0, x0)
        del history[order:]
        y = x - k.c[i]
        y_before[:] = [y]
        y = ratio[i] * y + k.m[i + 1] * sum(pred[i, j] * d for j, d in enumerate(history))
        if eta:
            y = y + spread[i] * noise(x, generator)
        return y + k.c[i + 1]
    return run(sde, score, x, k.t, step, denoise=denoise, progress=progress, after_step=after_step, desc=what)
