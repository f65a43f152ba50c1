"""The kernel's methods against each other and against sde(), in float64, within 1e-9 relative: two float64
formulas of one quantity (MATH.md sections 1, 3, 6).

    kernel_methods          scalar kernels: mean_coeff(), mean_offset(), std(), log_snr(), diffusion(), weight()
    step_methods            scalar kernels: discretize(), drift_divergence() and reverse() against the kernel and sde()
    general_methods         general modules: drift_divergence(), noise_gradient(), reverse() and discretize() against
                            autograd of sde()
    coupled_kernel_methods  coupled kernels: marginal_prob(), kernel(), transition(), time_change(), profile(),
                            sde(), diffusion(), drift_divergence(), weight()
"""
from __future__ import annotations

import torch

from .common import (IDENTITY_BOUND, NORMAL, CheckResult, Comparison, Settings, affine_coefficients,
                     affine_kernel, check_grid, components, coupled_coefficients, data_column, flat, initial_mean,
                     inversion_rounding, worst_row)

TINY = torch.finfo(torch.float64).tiny


def kernel_methods(sde, settings: Settings) -> list[CheckResult]:
    """The module's other kernel methods against marginal_prob(): mean_coeff(t) x0 + mean_offset(t),
    std(t), log_snr(t) = log(m^2 / v), diffusion(t) = the g of sde(), and weight(t) = v(t) (score_matching)
    or g(t)^2 (likelihood). Relative differences (logSNR: absolute) within 1e-9: two float64 formulas."""
    t = check_grid(sde)
    m, c, v = affine_kernel(sde, t)
    _, _, g = affine_coefficients(sde, t)
    n = t.shape[0]
    pairs = [("mean_coeff", sde.mean_coeff(t), m), ("mean_offset", sde.mean_offset(t), c),
             ("std", sde.std(t), v.sqrt()), ("diffusion", sde.diffusion(t), g)]
    weights = {"score_matching": v, "likelihood": g**2}
    if sde.weighting in weights:
        pairs.append((f"weight ({sde.weighting})", sde.weight(t), weights[sde.weighting]))
    comparisons = []
    for name, value, reference in pairs:
        value = flat(value, n, t)
        error = (value - reference).abs() / torch.clamp(reference.abs(), min=torch.finfo(t.dtype).tiny)
        comparisons += [Comparison(float(error[i]), IDENTITY_BOUND, f"{name} at t = {float(t[i]):.4g}")
                        for i in range(n)]
    log_snr = flat(sde.log_snr(t), n, t)
    error = (log_snr - (2 * torch.log(m.abs()) - torch.log(v))).abs()   # m^2 underflows where logSNR < -1400
    # Where m or v is below float64's normal range (a VP with beta_max = 1e4 has m(1/2) = e^-625), log m^2 / v has
    # lost its digits or is -inf: no reference for log_snr there, and the row says how many times it left out.
    formed = (m.abs() >= NORMAL) & (v >= NORMAL)
    comparisons += [Comparison(float(error[i]), IDENTITY_BOUND, f"log_snr at t = {float(t[i]):.4g}")
                    for i in range(n) if formed[i]]
    note = "relative difference (log_snr: absolute)"
    if not formed.all():
        note += f", log_snr left out at {int((~formed).sum())} times where m or v < {NORMAL:g}"
    return [worst_row("kernel methods agree", comparisons, note)]


UNIT = torch.finfo(torch.float64).eps
LARGE_ENOUGH = 1e-250   # |m| above this: m(t) / m(s) is a plain quotient, far from underflow
ROUNDING = 64 * UNIT    # a reference formed from a few float64 values: this many units of each value it sums
STEP_BOUND = 1e-7       # discretize's G^2 against the step's variance from sde(): the bound on numeric quantities
STEP_SUBSTEPS = 8       # Runge-Kutta steps over the module's own step T/N (and twice as many, for the error)
SCORE_TEST = (0.3, 1.0)  # the test score s(x, t) = -(x - 0.3) / (1 + t), any smooth function will do
STATES = (-2.0, 0.0, 3.0)


def _test_score(x, t):
    """s(x, t) = -(x - 0.3) / (1 + t) (SCORE_TEST): the score reverse() is checked with."""
    return -(x - SCORE_TEST[0]) / (SCORE_TEST[1] + t.reshape((-1,) + (1,) * (x.dim() - 1)))


def _comparisons(error: torch.Tensor, tol: torch.Tensor, t: torch.Tensor, where: str) -> list[Comparison]:
    """One Comparison per time t[i]: of error and tol (one shape, [n] or [n, ...]), the entry nearest its tolerance
    there; `where` names it, with {t} for the time."""
    n = t.shape[0]
    error, tol = error.reshape(n, -1), tol.reshape(n, -1)
    worst = (error / tol.clamp(min=TINY)).argmax(1)
    return [Comparison(float(error[i, worst[i]]), float(tol[i, worst[i]]), where.format(t=f"{float(t[i]):.4g}"))
            for i in range(n)]


def step_methods(sde, settings: Settings) -> list[CheckResult]:
    """discretize(), drift_divergence() and reverse() of a scalar affine module against its kernel and sde().

    discretize(x, t, s) = (f, G): f = (r - 1) x + c(t) - r c(s), G^2 = v(t) - r^2 v(s), r = m(t) / m(s), from the
    kernel methods (checked above), over the module's own step (s = t - T/N, where s >= eps) and over [t/2, t]. The
    difference forms cancel for short steps, so the tolerance is IDENTITY_BOUND of the result plus 3e-9 (the kernel
    methods' own bound, three times) and ROUNDING of each term. drift_divergence(x, t) = d a(t) for x of d = 3
    entries. reverse(s): sde() drift f - g^2 s (flow: f - g^2 s / 2), diffusion g (flow: 0), and discretize() drift
    f - G^2 s (flow: f - G^2 s / 2), noise G (flow: 0), for a test score s. G^2 over the module's own step is also
    held, within 1e-7 relative, to the step's variance from sde() alone (_step_variance): where v barely moves in
    relative terms over a step (a state that grows) v(t) - r^2 v(s) cancels, and so did the tolerance above."""
    t = check_grid(sde)
    eps, T = float(sde.eps), float(sde.T)
    steps = [(t - T / sde.N, "step T/N"), (t / 2, "step [t/2, t]")]
    states = torch.tensor(STATES, dtype=t.dtype, device=t.device)
    step, div, rev = [], [], []
    for s, label in steps:
        keep = s >= eps
        if not bool(keep.any()):
            continue
        tk, sk = t[keep], s[keep]
        n = tk.shape[0]
        m_t, c_t, v_t = affine_kernel(sde, tk)
        m_s, c_s, v_s = affine_kernel(sde, sk)
        # r = m(t) / m(s); where m underflows (VP at beta_max = 1e4: m(1) = e^-2500) from log m = (logSNR + log v) / 2,
        # the module's log_snr being checked against the kernel above.
        log_m = [(flat(sde.log_snr(u), n, t) + torch.log(v)) / 2 for u, v in ((tk, v_t), (sk, v_s))]
        r = torch.where((m_t.abs() > LARGE_ENOUGH) & (m_s.abs() > LARGE_ENOUGH), m_t / m_s,
                        torch.exp(log_m[0] - log_m[1]))
        for x_value in STATES:
            x = torch.full((n, 1), x_value, dtype=t.dtype, device=t.device)
            f, G = sde.discretize(x, tk) if label == "step T/N" else sde.discretize(x, tk, sk)
            f, G = flat(f, n, t), flat(G, n, t)
            f_ref = (r - 1) * x_value + c_t - r * c_s
            size = (r.abs() + 1) * abs(x_value) + c_t.abs() + (r * c_s).abs()
            tol = IDENTITY_BOUND * f_ref.abs() + (3e-9 + ROUNDING) * size
            step += _comparisons((f - f_ref).abs(), tol, tk, f"f at t = {{t}}, x = {x_value:g} ({label})")
        G2_ref = v_t - r**2 * v_s
        tol = IDENTITY_BOUND * G2_ref.abs() + (3e-9 + ROUNDING) * (v_t + r**2 * v_s)
        step += _comparisons((G**2 - G2_ref).abs(), tol, tk, f"G^2 at t = {{t}} ({label})")
        if label == "step T/N":
            # v(t) - r^2 v(s) cancels where v barely moves in relative terms over the step (a state that grows,
            # v ~ e^{2A}), and so does its tolerance: the module's own step is also held to its variance from sde()
            # alone, w' = 2 a w + g^2 from w(s) = 0 by Runge-Kutta, within STEP_BOUND relative.
            (w, w_half) = (_step_variance(sde, sk, tk, k) for k in (2 * STEP_SUBSTEPS, STEP_SUBSTEPS))
            # Where Runge-Kutta has not settled (|a| T/N far above 1: T = 1e20, whose step is 1e17) there is no
            # reference: those times are left out.
            settled = torch.isfinite(w) & torch.isfinite(w_half) & ((w - w_half).abs() <= 1e-3 * w.abs())
            if bool(settled.any()):
                tol = STEP_BOUND * w + 10 * (w - w_half).abs()
                step += _comparisons((G**2 - w).abs()[settled], tol[settled], tk[settled],
                                     "G^2 against w' = 2 a w + g^2 at t = {t} (step T/N)")
    n = t.shape[0]
    a, b, g = affine_coefficients(sde, t)
    x = states.expand(n, 3)
    divergence = flat(sde.drift_divergence(x, t), n, t)
    tol = IDENTITY_BOUND * (3 * a).abs() + ROUNDING * (3 * a).abs()
    div = _comparisons((divergence - 3 * a).abs(), tol, t, "at t = {t}")
    for x_value in STATES:
        x = torch.full((n, 1), x_value, dtype=t.dtype, device=t.device)
        s_x = flat(_test_score(x, t), n, t)
        f = a * x_value + b
        f_step, G_step = (flat(v, n, t) for v in sde.discretize(x, t))
        for flow in (False, True):
            scale, what = (0.5, "flow") if flow else (1.0, "reverse SDE")
            reverse = sde.reverse(_test_score, probability_flow=flow)
            (drift, diffusion), (rev_f, rev_G) = reverse.sde(x, t), reverse.discretize(x, t)
            pairs = [(drift, f - g**2 * s_x * scale, "sde drift"),
                     (diffusion, torch.zeros_like(g) if flow else g, "sde diffusion"),
                     (rev_f, f_step - G_step**2 * s_x * scale, "discretize drift"),
                     (rev_G, torch.zeros_like(g) if flow else G_step, "discretize noise")]
            for value, reference, part in pairs:
                size = reference.abs() + (g**2 * s_x).abs() + G_step**2 * s_x.abs() + f.abs() + f_step.abs()
                rev += _comparisons((flat(value, n, t) - reference).abs(),
                                    IDENTITY_BOUND * reference.abs() + ROUNDING * size, t,
                                    f"{what} {part} at t = {{t}}, x = {x_value:g}")
    return [worst_row("discretize vs kernel", step, "f and G^2 against m, c, v over the step, absolute, and G^2 "
                      "against the step's variance from sde(), relative 1e-7"),
            worst_row("drift_divergence = d a(t)", div, "absolute, d = 3 entries"),
            worst_row("reverse: f - g^2 s", rev, "reverse() and its flow ODE for a test score, absolute")]


def _step_variance(sde, s: torch.Tensor, t: torch.Tensor, substeps: int) -> torch.Tensor:
    """w(t) for w' = 2 a(u) w + g(u)^2, w(s) = 0: the variance one step of the SDE adds, from sde() alone (classical
    Runge-Kutta, `substeps` equal steps, every evaluation inside [s, t])."""
    h = (t - s) / substeps
    w = torch.zeros_like(t)

    def rhs(u, w):
        a, _, g = affine_coefficients(sde, u)
        return 2 * a * w + g**2
    for k in range(substeps):
        u, end = s + k * h, (s + (k + 1) * h if k + 1 < substeps else t)
        k1 = rhs(u, w)
        k2 = rhs(u + h / 2, w + h / 2 * k1)
        k3 = rhs(u + h / 2, w + h / 2 * k2)
        k4 = rhs(end, w + h * k3)
        w = w + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return w


GENERAL_STATES = (-2.0, -0.5, 0.0, 0.7, 2.0)  # one sample of five entries, the same at every time


def general_methods(sde, settings: Settings) -> list[CheckResult]:
    """drift_divergence(), noise_gradient(), reverse() and discretize() of a general module against autograd of its
    sde(), whose f and g act entry by entry: div f = sum_i df_i/dx_i, noise_gradient = d(g^2)/dx per entry, the
    reverse drift f - (d(g^2)/dx + g^2 s) (flow: half of both) for a test score s, and the Euler step
    (f (t - s), g sqrt(t - s)). Absolute differences within 1e-9 of the reference plus ROUNDING of its terms."""
    t = check_grid(sde, points=16)
    n = t.shape[0]
    x = torch.tensor(GENERAL_STATES, dtype=t.dtype, device=t.device).expand(n, len(GENERAL_STATES)).clone()
    with torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        f, g = sde.sde(leaf, t)
        # A part that does not depend on x (g = sqrt(2), a drift sin(t)) has no graph: its derivative is 0.
        df, dg2 = (torch.autograd.grad(y.sum(), leaf, retain_graph=True)[0] if y.requires_grad else
                   torch.zeros_like(x) for y in (f, g**2))
    f, g, df, dg2 = (v.detach() for v in (f, g, df, dg2))

    def compare(value, reference, size, where):
        error = (value.reshape(reference.shape) - reference).abs()
        return _comparisons(error, IDENTITY_BOUND * reference.abs() + ROUNDING * size, t, where + " at t = {t}")

    rows = []
    rows.append(worst_row("drift_divergence = autograd", compare(
        sde.drift_divergence(x, t), df.sum(1), df.abs().sum(1), "div f"), "absolute, 5 entries per sample"))
    rows.append(worst_row("noise_gradient = autograd", compare(
        sde.noise_gradient(x, t), dg2, dg2.abs(), "d(g^2)/dx"), "absolute, entrywise"))

    s_x = _test_score(x, t)
    reverse = []
    for flow in (False, True):
        scale, what = (0.5, "flow") if flow else (1.0, "reverse SDE")
        drift, diffusion = sde.reverse(_test_score, probability_flow=flow).sde(x, t)
        reference = f - scale * (dg2 + g**2 * s_x)
        reverse += compare(drift, reference, f.abs() + dg2.abs() + (g**2 * s_x).abs(), f"{what} drift")
        reverse += compare(diffusion, torch.zeros_like(g) if flow else g, g.abs(), f"{what} diffusion")
    rows.append(worst_row("reverse: f - (g^2)' - g^2 s", reverse, "reverse() and its flow ODE for a test score, "
                          "absolute"))
    step = (t - torch.clamp(t - float(sde.T) / sde.N, min=0.0))[:, None]
    f_step, G_step = sde.discretize(x, t)
    rows.append(worst_row("discretize: Euler step", compare(f_step, f * step, (f * step).abs(), "f (t - s)")
                          + compare(G_step, g * step.sqrt(), (g * step.sqrt()).abs(), "g sqrt(t - s)"),
                          "absolute, s = t - T/N"))
    return rows


# -- Coupled kernels: each helper returns (what, relative error [n, ...] or [1, ...]) pairs --------------------

def _relative(value: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|value - reference| / scale per entry, 0 where they agree exactly (an entry that must vanish)."""
    error = (value.to(torch.float64) - reference).abs()
    return torch.where(error == 0, error, error / scale.clamp(min=TINY))


def _normwise(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """max |value - reference| / max |reference| per matrix [n]: the measure of accuracy of a matrix function
    (an entry far below the largest, like Q_xx ~ r^3 near r = 0, carries the rounding of the larger ones)."""
    error = (value - reference).abs().flatten(1).amax(-1)
    return torch.where(error == 0, error, error / reference.abs().flatten(1).amax(-1))


def _marginal_prob(sde, t: torch.Tensor, Phi: torch.Tensor, Sigma: torch.Tensor) -> list:
    """marginal_prob(x0, t) at x0 = 0 and 1: mean Phi (x0 e_data + u0_aux), covariance Sigma of kernel(t)
    (each entry on the scale sqrt(Sigma_ii Sigma_jj) of its standard deviations)."""
    variances = Sigma.diagonal(dim1=-2, dim2=-1)
    correlation_scale = (variances[:, :, None] * variances[:, None, :]).sqrt()
    column, aux = data_column(sde, Phi), initial_mean(sde)
    checks = []
    for x0 in (0.0, 1.0):
        mean, covariance = sde.marginal_prob(torch.full((t.shape[0], 1), x0, dtype=t.dtype, device=t.device), t)
        checks += [(f"marginal_prob mean at x0 = {x0:g}",
                    _relative(mean, x0 * column + Phi @ aux, x0 * column.abs() + Phi.abs() @ aux.abs())),
                   (f"marginal_prob covariance at x0 = {x0:g}", _relative(covariance, Sigma, correlation_scale))]
    return checks


def _transition(sde, t: torch.Tensor, Phi: torch.Tensor, Sigma: torch.Tensor) -> list:
    """kernel(t) = (Phi(B(t)), Phi Sigma0 Phi^T + Q(B(t))) from transition() and time_change(); transition(0)
    = (I, 0); the semigroup Phi(r + s) = Phi(s) Phi(r), Q(r + s) = Phi(s) Q(r) Phi(s)^T + Q(s) at r = B(t) / 3,
    s = 2 B(t) / 3, normwise."""
    Sigma0 = sde.Sigma0.to(torch.float64)
    r = sde.time_change(t).to(torch.float64)
    Phi_r, Q_r = sde.transition(r)
    Phi_0, Q_0 = sde.transition(torch.zeros(1, dtype=torch.float64, device=t.device))
    Phi_a, Q_a = sde.transition(r / 3)
    Phi_b, Q_b = sde.transition(2 * r / 3)
    start = Phi_r @ Sigma0 @ Phi_r.transpose(1, 2)
    start_scale = Phi_r.abs() @ Sigma0.abs() @ Phi_r.abs().transpose(1, 2)
    return [("kernel Phi = transition Phi(B(t))", _relative(Phi, Phi_r, Phi_r.abs())),
            ("kernel Sigma = Phi Sigma0 Phi^T + Q(B(t))", _relative(Sigma, start + Q_r, start_scale + Q_r.abs())),
            ("transition(0) Phi = I", (Phi_0 - torch.eye(components(sde), dtype=torch.float64, device=t.device)).abs()),
            ("transition(0) Q = 0", Q_0.abs()),
            ("Phi(r + s) = Phi(s) Phi(r)", _normwise(Phi_r, Phi_b @ Phi_a)),
            ("Q(r + s) = Phi(s) Q(r) Phi(s)^T + Q(s)", _normwise(Q_r, Phi_b @ Q_a @ Phi_b.transpose(1, 2) + Q_b))]


def _coefficients(sde, t: torch.Tensor, F: torch.Tensor, f0: torch.Tensor, g: torch.Tensor) -> list:
    """sde() against the attributes: F(t) = profile(t) F0, g_k^2 = profile(t) D0_kk with D0 diagonal, no
    constant drift; diffusion(t) = g; drift_divergence(u, t) = tr F(t) for one data entry."""
    phi = sde.profile(t).to(torch.float64)
    F0, D0 = sde.F0.to(torch.float64), sde.D0.to(torch.float64)
    n, K = t.shape[0], components(sde)
    divergence = flat(sde.drift_divergence(torch.zeros(n, K, dtype=t.dtype, device=t.device), t), n, t)
    trace = F.diagonal(dim1=-2, dim2=-1)
    return [("F of sde() = profile(t) F0", _relative(F, phi[:, None, None] * F0, (phi[:, None, None] * F0).abs())),
            ("g^2 of sde() = profile(t) diag(D0)",
             _relative(g**2, phi[:, None] * D0.diagonal(), (phi[:, None] * D0.diagonal()).abs())),
            ("D0 is diagonal", (D0 - torch.diag_embed(D0.diagonal())).abs()[None]),
            ("sde(0) = 0 (no constant drift)", f0.abs()),
            ("diffusion(t) = g of sde()", _relative(sde.diffusion(t), g, g.abs())),
            ("drift_divergence = tr F(t)", _relative(divergence, trace.sum(-1), trace.abs().sum(-1)))]


def _weight(sde, t: torch.Tensor, Sigma: torch.Tensor, g: torch.Tensor) -> list:
    """weight(t) = sum over noisy k of g_k^2 (Sigma^-1)_kk for the likelihood weighting ((Sigma^-1)_NN is the
    inverse of the noisy components' covariance given the others), 1 for score_matching."""
    n = t.shape[0]
    weight = flat(sde.weight(t), n, t).to(torch.float64)
    if sde.weighting == "likelihood":
        noisy = torch.as_tensor(sde.noisy, device=t.device)
        precision = torch.linalg.inv(Sigma).diagonal(dim1=-2, dim2=-1)
        expected = torch.where(noisy, g**2 * precision, torch.zeros_like(precision)).sum(-1)
        return [("weight = sum_k g_k^2 (Sigma^-1)_kk", _relative(weight, expected, expected),
                 IDENTITY_BOUND + inversion_rounding(Sigma))]
    return [(f"weight = 1 ({sde.weighting})", (weight - 1).abs())]


def coupled_kernel_methods(sde, settings: Settings) -> list[CheckResult]:
    """A coupled module's methods against each other at the check times, within 1e-9 relative (each entry
    relative to the scale of what makes it, |Phi| |u0|, sqrt(Sigma_ii Sigma_jj), ...; absolute where it must
    vanish): marginal_prob() against kernel(), kernel() against transition() and time_change(), transition()
    against itself (the semigroup), sde() against profile(), F0 and D0, and weight() against Sigma."""
    t = check_grid(sde)
    Phi, Sigma = sde.kernel(t)
    F, f0, g = (q.to(torch.float64) for q in coupled_coefficients(sde, t))
    checks = (_marginal_prob(sde, t, Phi, Sigma) + _transition(sde, t, Phi, Sigma) + _coefficients(sde, t, F, f0, g)
              + _weight(sde, t, Sigma, g))
    comparisons, unchecked = [], 0
    for what, error, *bound in checks:
        worst = error.reshape(error.shape[0], -1).amax(-1)
        at = [f" at t = {float(time):.4g}" for time in t] if len(worst) == len(t) else [""]
        bounds = [float(b) for b in bound[0]] if bound else [IDENTITY_BOUND] * len(at)
        # A reference whose rounding alone reaches 10 % checks nothing: those times are counted, not compared.
        unchecked += sum(b >= 0.1 for b in bounds)
        comparisons += [Comparison(float(worst[i]), bounds[i], f"{what}{at[i]}") for i in range(len(at))
                        if bounds[i] < 0.1]
    skipped = f"; {unchecked} times left out, where Sigma is too ill-conditioned for it" if unchecked else ""
    return [worst_row("kernel methods agree", comparisons, "relative difference (absolute where it must vanish); "
                      f"weight: 1e-9 + the rounding of its float64 reference, K u cond(corr(Sigma)){skipped}")]
