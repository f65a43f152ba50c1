"""The log signal-to-noise ratio of the kernel, logSNR(t) = log(m(t)^2 / v(t))."""
from __future__ import annotations

import sympy as sp

from .kernel import Kernel
from .symbolic import Accuracy, log_exp_differences, printable, rewrites, simplest


def log_snr(k: Kernel, t: sp.Symbol, accuracy: Accuracy, given: sp.Expr | None = None) -> sp.Expr:
    """log(m^2 / v), expanded so that no huge or tiny ratio is formed before the log; ``given``, the
    logSNR a program states (logsnr(t) = ...), is one more candidate.

    It decreases strictly in t: d/dt logSNR = -g^2 / v < 0.
    """
    candidates = [-sp.log(nsr) for nsr in rewrites(k.v / k.m**2)] + ([given] if given is not None else [])
    candidates += [sp.expand_log(c) for c in candidates]
    # log(c (e^u - 1)) as log(c) + u + log(-expm1(-u)): no e^u formed, which float32 cannot hold once u > 88 (an OU
    # process with rate 30 on [0, 2] at t = T: logSNR -inf).
    candidates += [f for c in list(candidates) if (f := log_exp_differences(
        c, t, accuracy.defaults, accuracy.eps, accuracy.T)) is not None and printable(f)]
    return accuracy.best(candidates, t)


def noise_to_signal(k: Kernel) -> sp.Expr:
    """v / m^2 = exp(-logSNR), simplified: for VP it is expm1(B(t))."""
    return simplest(k.v / k.m**2)
