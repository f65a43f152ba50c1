"""Coupled linear SDEs: several 'd<name> = ...' lines, linear drifts, noise g_k(t), one time profile."""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..ir import Component
from .common import EVALUATE_SECONDS, TIME, call_with_time_limit


class CoupledPass:
    """The components of a coupled SDE, each checked where it is written."""

    def _components(self, symbols, scope, eps, T) -> tuple[Component, ...]:
        """The lines of a coupled SDE: drifts linear in the components, noise g_k(t) >= 0, initial laws."""
        components = []
        for name, st in self.sdes.items():
            drift = self.lower(st.drift, scope) if st.drift is not None else sp.Integer(0)
            span = st.drift.span if st.drift is not None else st.span
            for u in symbols.values():
                if sp.diff(drift, u, 2) != 0 or any(sp.diff(drift, u).has(w) for w in symbols.values()):
                    raise self.error(f"the drift of d{name} is not linear in the components", span,
                                     "a coupled SDE has the drift F(t) u: a sum of terms c(t) * component")
            if drift.subs({u: 0 for u in symbols.values()}) != 0:
                raise self.error(f"the drift of d{name} has a term without a component", span,
                                 "a coupled SDE has the drift F(t) u, with no constant term b(t)")
            diffusion = sp.Integer(0)
            if st.diffusion is not None:
                diffusion = self.lower(st.diffusion, scope)
                if any(diffusion.has(u) for u in symbols.values()):
                    raise self.error(f"the diffusion of d{name} depends on the state", st.diffusion.span,
                                     "a coupled SDE has diffusions g(t) of time only")
                if diffusion != 0:
                    self._check_positive(diffusion, st.diffusion.span, eps, T, f"the diffusion of d{name}",
                                         "g(t) must be positive on [eps, T]; leave out '... dw' for no noise")
            for part in (*(sp.diff(drift, u) for u in symbols.values()),):
                values = self._on_grid(part, eps, T)
                if not np.all(np.isfinite(values)):
                    bad = self._grid(eps, T)[~np.isfinite(values)][0]
                    raise self.error(f"the drift of d{name} is not finite at t = {bad:.6g}", span,
                                     "choose [eps, T] inside the drift's domain")
            init = self.inits.get(name)
            mean = variance = None
            if init is not None:
                mean = self.lower(init.mean, self._constant_scope("an initial mean"))
                variance = self.lower(init.variance, self._constant_scope("an initial variance"))
                self.constant(init.mean, "the initial mean")
                if self.constant(init.variance, "the initial variance") < 0:
                    raise self.error("the initial variance cannot be negative", init.variance.span,
                                     "the second argument of normal(mean, variance) is a variance")
            components.append(Component(name, symbols[name], drift, diffusion, mean, variance, st.span))
        data = [c for c in components if c.init_mean is None]
        if not data:
            raise self.error("every component has an initial law, so none is the data", self.inits[components[0].name].span,
                             f"leave out the initial law of the data component, e.g. of '{components[0].name}'")
        if len(data) > 1:
            raise self.error(f"component '{data[1].name}' has no initial law; only the data component may lack one",
                             data[1].span, f"add '{data[1].name}(0) ~ normal(mean, variance)', or make "
                             f"'{data[1].name}' the data and give '{data[0].name}' an initial law")
        if all(c.diffusion == 0 for c in components):
            raise self.error("no component has noise: a coupled SDE needs at least one '... dw'",
                             components[0].span, "add a diffusion to one line, e.g. 'dv = ... dt + sqrt(2) dw'")
        self._check_time_profile(components)
        return tuple(components)

    def _check_time_profile(self, components) -> None:
        """F(t) = phi(t) F0 and G(t)^2 = phi(t) D0 with one phi: then the kernel depends on t only through
        B(t) = int_0^t phi, a matrix exponential of constant matrices (derive/coupled.py)."""
        entries = [(sp.diff(c.drift, d.symbol), c) for c in components for d in components]
        entries += [(c.diffusion**2, c) for c in components]
        nonzero = [(e, c) for e, c in entries if e != 0]
        phi, first = nonzero[0]
        for e, c in nonzero:
            done, ratio = call_with_time_limit(EVALUATE_SECONDS, sp.simplify, e / phi)
            if not done or ratio.has(TIME):
                raise self.error(f"the coefficients of d{c.name} and d{first.name} change with time differently",
                                 c.span, "a coupled SDE's drift matrix F(t) and noise G(t)^2 share one time profile: "
                                 "write every coefficient as a constant times the same phi(t), e.g. beta(t) * (...)")
