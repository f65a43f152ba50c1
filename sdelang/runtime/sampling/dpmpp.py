"""Multistep exponential integrators in data or noise prediction for any affine SDE (MATH.md section 9).

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

The same flow in the noise prediction eps_hat = -sigma s = (y - m x0_hat) / sigma (eta = 0):

    y_t = (m_t / m_s) y_s - sigma_t int_{-h}^0 e^{-u} eps_hat(lambda_t + u) du,

with eps_hat replaced by its polynomial through the last p predictions: DEIS's multistep exponential
integrator (Zhang & Chen 2023), whose "tAB" takes the polynomial in t (variable "time") and whose
"rhoAB" in sigma / m = e^{-lambda} (variable "sigma"; with order 4 and no corrector that is `lms`, the
linear multistep method in k-diffusion's sigma, whose weights are Adams-Bashforth coefficients for
uneven steps). Its weights are the data prediction's with a = -1. The polynomial's variable: lambda,
sigma / sigma_t = e^{-u}, the time t(lambda), found by inverting logSNR at the quadrature nodes before the
loop, or the variable of the floored grid, log(sigma + SIGMA_FLOOR) (grids.py): lambda at high noise,
sigma below the floor, where E[x0 | x] = x0 + O(sigma^2) is a polynomial in sigma and one in lambda would
extrapolate e^{-2 lambda}.

The first steps run at lower order (warm-up: step i uses min(order, i + 1) nodes), and with fewer than
LOWER_ORDER_FINAL steps the last ones too (step i uses at most steps - i nodes), as DPM-Solver does:
extrapolating a polynomial over a long last step from far-away nodes is what few-step grids get wrong.
`lms` keeps its order to the end (lower_order_final=False), as linear multistep methods and k-diffusion's
lms do: in noise prediction in sigma the last steps gained nothing by lowering it (measured at 5 NFE).
All weights are computed in float64 before the loop, so the loop makes no host-device synchronisation.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..logsnr import log_snr_inverse
from .common import Samples, check_choice, check_count, check_positive, fixed_step, noise, run, schedule
from .grids import floored_log_sigma

VARIABLES = ("lambda", "sigma", "time", "floored")
PREDICTIONS = ("data", "noise")
FORMS = ("exact", "published")
MAX_ORDER = 4
# Below this many steps the last steps lower their order (DPM-Solver's lower_order_final).
LOWER_ORDER_FINAL = 10


# Gauss-Legendre nodes and weights on [-1, 0] for the step integrals: the integrands are entire
# functions of u, and 32 nodes integrate them to rounding error for steps up to h = 10 in lambda.
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(32)
_NODES, _WEIGHTS = (_NODES - 1) / 2, _WEIGHTS / 2
# Gauss-Legendre on [0, 1] with MAX_ORDER nodes: exact for the Lagrange basis polynomials of degree
# < MAX_ORDER that the Adams-Bashforth weights integrate (exact up to degree 2 MAX_ORDER - 1).
_AB_NODES, _AB_WEIGHTS = np.polynomial.legendre.leggauss(MAX_ORDER)
_AB_NODES, _AB_WEIGHTS = (_AB_NODES + 1) / 2, _AB_WEIGHTS / 2


def _weights(nodes: list[float], h: float, a: float, variable: str, warp_at=None) -> np.ndarray:
    """w_j = int_{-h}^0 a e^{a u} L_j du, L_j the Lagrange basis of the nodes (u-positions) as a polynomial
    in u (variable "lambda"), in sigma / sigma_t = e^{-u} ("sigma"), or in the time t(lambda_t + u) ("time")
    or log(sigma + SIGMA_FLOOR) at lambda_t + u ("floored"), which warp_at maps u-positions to, by
    quadrature of the product form of L_j (no monomial expansion, so no cancellation when the nodes are
    close). a = 1 + eta weights a data prediction, a = -1 a noise prediction (the integral of -e^{-u} L_j),
    which in sigma is the integral of a polynomial, taken exactly (_adams_bashforth)."""
    if variable == "sigma" and a == -1:
        return _adams_bashforth(nodes, h)
    u = h * _NODES
    kernel = h * _WEIGHTS * a * np.exp(a * u)
    if variable == "lambda":
        warp = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
    elif variable == "sigma":
        warp = lambda v: np.expm1(-np.asarray(v, dtype=np.float64))  # noqa: E731
    else:
        warp = warp_at
    return _basis_integrals(warp(u), [float(p) for p in warp(np.array(nodes))], kernel)


def _basis_integrals(x: np.ndarray, points: list[float], kernel: np.ndarray) -> np.ndarray:
    """[kernel @ L_j(x)] over j: a quadrature (weights `kernel` at the abscissae x) of each Lagrange basis
    polynomial of the points, in its product form."""
    weights = []
    for j, node in enumerate(points):
        basis = np.ones_like(x)
        for i, other in enumerate(points):
            if i != j:
                basis = basis * (x - other) / (node - other)
        weights.append(float(kernel @ basis))
    return np.array(weights)


def _adams_bashforth(nodes: list[float], h: float) -> np.ndarray:
    """The noise prediction's weights with its polynomial in sigma: w_j = -int_{-h}^0 e^{-u} L_j du, L_j
    the Lagrange basis in w = sigma / sigma_t - 1 = e^{-u} - 1 of the nodes' w_i = e^{-u_i} - 1. As
    dw = -e^{-u} du, w_j = -int_0^{e^h - 1} L_j(w) dw: the integral of a polynomial, which Gauss-Legendre
    with MAX_ORDER nodes gives exactly (no quadrature error, whatever h). sigma_t w_j / m_t are the
    Adams-Bashforth coefficients int_{sigma_s}^{sigma_t} L_j d sigma of x_k' = eps_hat in the VE-form
    variables x_k = y / m, sigma_k = sigma / m (linear multistep in sigma, k-diffusion's lms)."""
    end = math.expm1(h)
    return _basis_integrals(end * _AB_NODES, [math.expm1(-p) for p in nodes], -end * _AB_WEIGHTS)


def _published_2m(nodes: list[float], h: float, a: float) -> np.ndarray:
    """DPM-Solver++(2M)'s own weights for the nodes -h and -h - h_prev: (1 - e^{-a h}) times
    (1 + 1 / (2 r), -1 / (2 r)), r = h_prev / h (a first-order integral of a midpoint extrapolation)."""
    r = (nodes[0] - nodes[1]) / h
    phi = -math.expm1(-a * h)
    return np.array([phi * (1 + 1 / (2 * r)), -phi / (2 * r)])


def _published_3m(nodes: list[float], h: float, a: float) -> np.ndarray:
    """DPM-Solver++(3M)'s own weights for the nodes -h, -h - h_1, -h - h_1 - h_2: with the quadratic through
    them written D0 + d1 tau + d2 tau^2 in tau = (lambda - lambda_s) / h, the step adds phi_1 D0
    + phi_2 d1 - phi_3 d2, phi_1 = 1 - e^{-ah}, phi_2 = 1 - phi_1 / (ah), phi_3 = phi_2 / (ah) - 1/2, where
    the exact integral of tau^2 would be -2 phi_3: the published form halves the curvature term, which
    extrapolates less over long steps but leaves an h^3 local error, so it is of second order globally
    (measured 2.1-2.4 on Gaussian data). k-diffusion's dpmpp_3m_sde at eta = 0 is this method; registered
    as `dpmpp_3m_published`."""
    r0, r1 = (nodes[0] - nodes[1]) / h, (nodes[1] - nodes[2]) / h
    ah = a * h
    phi1 = -math.expm1(-ah)
    phi2 = 1 - phi1 / ah
    phi3 = phi2 / ah - 0.5
    weights = []
    for unit in np.eye(3):
        slope_0, slope_1 = (unit[0] - unit[1]) / r0, (unit[1] - unit[2]) / r1
        d2 = (slope_0 - slope_1) / (r0 + r1)
        d1 = slope_0 + d2 * r0
        weights.append(phi1 * unit[0] + phi2 * d1 - phi3 * d2)
    return np.array(weights)


def plan(lam: np.ndarray, order: int, eta: float, corrector: bool, variable: str, form: str = "exact",
         prediction: str = "data", time_of=None, lower_order_final: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Predictor and corrector weights, [steps, order] and [steps, order + 1] (zero-padded).

    Step i goes from lam[i] to lam[i + 1]; predictor node j is lam[i - j]; corrector node 0 is
    lam[i + 1] (the new evaluation) and node j + 1 is lam[i - j]. Row i of the corrector weights redoes
    step i once the prediction at lam[i + 1] is known (unused for the last step, which has no evaluation
    after it). time_of maps lambda to t (float64 arrays), for variable "time".
    """
    steps = len(lam) - 1
    a = 1.0 + eta if prediction == "data" else -1.0
    predictor, correct = np.zeros((steps, order)), np.zeros((steps, order + 1))
    for i in range(steps):
        p = min(order, i + 1)
        if lower_order_final and steps < LOWER_ORDER_FINAL:
            p = min(p, steps - i)
        h = lam[i + 1] - lam[i]
        past = [lam[i - j] - lam[i + 1] for j in range(p)]
        warp_at = None
        if variable == "time":
            warp_at = lambda u, end=lam[i + 1]: time_of(end + np.asarray(u, dtype=np.float64))  # noqa: E731
        elif variable == "floored":
            def warp_at(u, end=lam[i + 1]):
                return floored_log_sigma(2 * (end + np.asarray(u, dtype=np.float64)))
        # The published 3M's two-node warm-up step integrates the line exactly (as k-diffusion's does).
        if form == "published" and p == order == 2:
            predictor[i, :p] = _published_2m(past, h, a)
        elif form == "published" and p == 3:
            predictor[i, :p] = _published_3m(past, h, a)
        else:
            predictor[i, :p] = _weights(past, h, a, variable, warp_at)
        if corrector:
            correct[i, : p + 1] = _weights([0.0] + past, h, a, variable, warp_at)
    return predictor, correct


def multistep(sde, score_fn, shape, steps, *, order=2, corrector=False, eta=0.0, spacing="logsnr", variable="lambda",
              form="exact", prediction="data", lower_order_final=True,
              generator=None, denoise=True, progress=False, x_T=None, after_step=None) -> Samples:
    """DPM-Solver++ pM (order p = 1 .. 4) on y = x - c(t), with the UniPC-style corrector if asked and
    the reverse SDE's noise if eta > 0 (see the module docstring). form="published" takes DPM-Solver++(2M)'s
    own weights for the two-node steps of order 2 instead of the exact integral of the line through the
    nodes (same order; it extrapolates less over long steps, which measured better at 10-50 NFE), and
    DPM-Solver++(3M)'s for three-node steps (_published_3m: second order). prediction="noise" interpolates
    the noise prediction eps_hat = -sigma s instead of x0_hat (flow ODE only; `deis`, `lms`).
    lower_order_final=False keeps the full order in the last steps of grids below LOWER_ORDER_FINAL steps.
    NFE: steps (+1)."""
    order = check_count("order", order, 1)
    if order > MAX_ORDER:
        raise ValueError(f"order must be 1, 2, 3 or 4, got {order}")
    check_choice("variable", variable, VARIABLES)
    check_choice("form", form, FORMS)
    check_choice("prediction", prediction, PREDICTIONS)
    if eta != 0:
        check_positive("eta", eta)
    if corrector and eta != 0:
        raise ValueError("the corrector is for the flow ODE (eta = 0): a stochastic step has no polynomial to refit")
    if prediction == "noise" and eta != 0:
        raise ValueError("the noise prediction is for the flow ODE (eta = 0); the SDE steps use the data prediction")
    noise_name = "lms" if variable == "sigma" and not corrector else "deis"
    what = (f"dpmpp_{order}m" if prediction == "data" else f"{noise_name} (order {order})") + ("_sde" if eta else "") \
        + (" with a corrector" if corrector else "")
    steps, score, x, grid, denoise = fixed_step(sde, score_fn, shape, steps, generator, x_T, what=what,
                                                kernel=True, denoise=denoise, spacing=spacing)
    k64 = schedule(sde, grid, grid)
    lam64 = k64.log_snr / 2

    def time_of(lam: np.ndarray) -> np.ndarray:
        target = torch.as_tensor(2 * lam, dtype=torch.float64, device=grid.device)
        return log_snr_inverse(sde, target).cpu().numpy()

    pred, corr = plan(lam64.cpu().numpy(), order, float(eta), corrector, variable, form, prediction, time_of,
                      lower_order_final)
    h = lam64[1:] - lam64[:-1]
    sigma64 = k64.v.sqrt()
    if prediction == "data":
        ratio = (sigma64[1:] / sigma64[:-1] * torch.exp(-eta * h)).to(x.dtype)
        scale = k64.m.to(x.dtype)
    else:
        ratio = (k64.m[1:] / k64.m[:-1]).to(x.dtype)
        scale = sigma64.to(x.dtype)
    spread = (sigma64[1:] * torch.sqrt(-torch.expm1(-2 * eta * h))).to(x.dtype)
    pred, corr = (torch.as_tensor(w, dtype=x.dtype, device=x.device) for w in (pred, corr))
    k = schedule(sde, grid, x)
    sigma = k.v.sqrt()
    history: list[torch.Tensor] = []  # predictions at lam[i], lam[i - 1], ...
    y_before: list[torch.Tensor] = []  # y at the start of the last step, for the corrector

    def predict(x, i, t):
        s = score(x, t)
        return (x - k.c[i] + k.v[i] * s) / k.m[i] if prediction == "data" else -sigma[i] * s

    def step(x, i, t, t_next):
        d = predict(x, i, t)
        if corrector and i > 0:
            nodes = [d] + history
            y = ratio[i - 1] * y_before[0] + scale[i] * sum(corr[i - 1, j] * n for j, n in enumerate(nodes))
            x = y + k.c[i]
        history.insert(0, d)
        del history[order:]
        y = x - k.c[i]
        y_before[:] = [y]
        y = ratio[i] * y + scale[i + 1] * sum(pred[i, j] * n for j, n in enumerate(history))
        if eta:
            y = y + spread[i] * noise(x, generator)
        return y + k.c[i + 1]
    return run(sde, score, x, k.t, step, denoise=denoise, progress=progress, after_step=after_step, desc=what)
