"""`sdelang show`: every derived quantity of a program, as plain text, LaTeX or Markdown.

The expressions are the derivation's own, printed for reading: a rational with a large denominator
(eps = 1e-5 inside a closed form) as a decimal, each integral without a closed form named once
(I(t) = int_0^t ... ds, its own row) instead of repeated inside every quantity that uses it, written
through the helpers the program names (beta(t), as in the source: codegen/fold.py), and the LaTeX
restricted to what both pdflatex and matplotlib's mathtext render.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from ..compiler.codegen.emit import plain_names
from ..compiler.codegen.fold import fold
from ..compiler.codegen.printer import stable
from ..compiler.derive import CoupledDerivation, Derivation, GeneralDerivation
from ..compiler.derive.reverse import SCORE
from ..compiler.derive.symbolic import Smaller

FORMATS = ("text", "latex", "markdown")
_LARGE_DENOMINATOR = 1000   # 1/100000 reads better as 1e-05; 1/2 and 3/4 stay exact


def _number(value) -> str:
    value = sp.sympify(value)
    if isinstance(value, sp.Rational) and value.q > _LARGE_DENOMINATOR:
        return f"{float(value):.6g}"
    return sp.sstr(value)


def _decimals(expr: sp.Expr) -> sp.Expr:
    """Rationals with large denominators as floats, which the printers below write with 6 digits."""
    return expr.xreplace({r: sp.Float(r) for r in expr.atoms(sp.Rational) if r.q > _LARGE_DENOMINATOR})


class _TextPrinter(StrPrinter):
    def _print_Float(self, expr):
        return f"{float(expr):.6g}"


class _LatexPrinter(LatexPrinter):
    def _print_Float(self, expr):
        mantissa, _, exponent = f"{float(expr):.6g}".partition("e")
        return mantissa + (f" \\cdot 10^{{{int(exponent)}}}" if exponent else "")

    def _print_Integral(self, expr):   # no \\limits, which mathtext does not know
        return super()._print_Integral(expr).replace("\\limits", "")


def _rows(d: Derivation | GeneralDerivation | CoupledDerivation) -> list[tuple[str, sp.Expr | str]]:
    if isinstance(d, GeneralDerivation):
        return _general_rows(d)
    if isinstance(d, CoupledDerivation):
        return _coupled_rows(d)
    p, k, imp = d.program, d.kernel, d.importance
    score = sp.Symbol("s(x,t)")
    return [
        *_given_rows(d),
        ("drift f(x, t)", p.drift),
        ("a(t) (f = a x + b)", d.a),
        ("b(t)", d.b),
        ("diffusion g(t)", p.diffusion),
        ("g(t)^2", d.g2),
        ("kernel", d.kernel_path),
        ("mean coefficient m(t)", k.m),
        ("mean offset c(t)", k.c),
        ("variance v(t)", k.v),
        ("std sigma(t)", k.std),
        ("logSNR(t) = log(m^2/v)", d.log_snr),
        ("reverse drift f - g^2 s", d.reverse_drift.xreplace({SCORE: score})),
        ("flow drift f - g^2 s / 2", d.flow_drift.xreplace({SCORE: score})),
        (f"weighting lambda(t) ({p.weighting})", d.weight),
        ("t sampling", p.t_sampling),
        *(_importance_rows(d) if p.t_sampling == "importance" else ()),
        ("prior mean", d.prior_mean),
        ("prior variance", d.prior_variance),
        ("step ratio m(t)/m(s)", d.step.ratio),
        *_step_rows(d.step.variance),
        (f"drift divergence ({_dimension_name(d.divergence)}: entries of one sample)", d.divergence),
        ("[eps, T]", f"[{_number(p.eps)}, {_number(p.T)}]"),
        ("N (steps)", str(p.N)),
        ("v0", p.v0),
    ]


def _step_rows(variance: sp.Expr) -> list[tuple[str, sp.Expr]]:
    """G^2, or its two forms where the module picks the one of smaller size (derive/discretize.py: with_tail)."""
    if not isinstance(variance, Smaller):
        return [("step variance G^2", variance)]
    _, _, tail, head = variance.args
    return [("step variance G^2 where m(t)^2 J(s) < v(t)", tail), ("step variance G^2 elsewhere", head)]


def _dimension_name(divergence: sp.Expr) -> str:
    """The name the data dimension prints with: d, or d' beside a parameter called d."""
    plain = plain_names(divergence)
    return next((s.name for s in plain.free_symbols if s.name.startswith("d") and set(s.name[1:]) <= {"'"}
                 and s not in divergence.free_symbols), "d")


def _given_rows(d: Derivation) -> list[tuple[str, sp.Expr | str]]:
    """For a process given by its kernel or logSNR: what was given, and the SDE derived from it."""
    given = d.program.given
    if given is None:
        return []
    x = d.program.x
    printer = _TextPrinter()

    def text(e):
        return printer.doprint(stable(_decimals(plain_names(e))))
    mean = given.m * sp.Symbol(f"{x}(0)") + given.c
    stated = (f"logsnr(t) = {text(given.log_snr)}" if given.form == "logsnr" else
              f"{x}(t) ~ normal({text(mean)}, {text(given.v)})")
    return [("given", stated),
            ("derived SDE", f"d{x} = ({text(d.a * x + d.b)}) dt + sqrt({text(d.g2)}) dw"),
            ("  from", "a = d/dt log alpha, b = c' - a c, g^2 = (sigma^2)' - 2 a sigma^2 = -sigma^2 d/dt logSNR")]


def _general_rows(d: GeneralDerivation) -> list[tuple[str, sp.Expr | str]]:
    p = d.program
    score = sp.Symbol("s(x,t)")
    return [
        ("drift f(x, t)", p.drift),
        ("diffusion g(x, t)", p.diffusion),
        ("g^2", d.g2),
        ("kernel", d.kernel_path),
        ("div D = d(g^2)/dx", d.noise_gradient),
        ("reverse drift f - dD/dx - D s", d.reverse_drift.xreplace({SCORE: score})),
        ("flow drift f - (dD/dx + D s)/2", d.flow_drift.xreplace({SCORE: score})),
        (f"weighting lambda(t) ({p.weighting})", d.weight),
        ("t sampling", p.t_sampling),
        ("prior mean", d.prior_mean),
        ("prior variance", d.prior_variance),
        ("drift divergence df/dx", d.divergence),
        ("[eps, T]", f"[{_number(p.eps)}, {_number(p.T)}]"),
        ("N (steps)", str(p.N)),
        ("v0", p.v0),
        *(("unavailable", f"{what}: {why}") for what, why in sorted(d.unavailable.items())),
    ]


def _coupled_rows(d: CoupledDerivation) -> list[tuple[str, sp.Expr | str]]:
    p = d.program
    rows: list[tuple[str, sp.Expr | str]] = [
        ("components", ", ".join(c.name + (" (data)" if c.init_mean is None else "") for c in p.components)),
        *((f"d{c.name}", f"({sp.sstr(c.drift)}) dt" + (f" + {sp.sstr(c.diffusion)} dw" if c.diffusion != 0 else ""))
          for c in p.components),
        *((f"{c.name}(0)", f"normal({sp.sstr(c.init_mean)}, {sp.sstr(c.init_variance)})")
          for c in p.components if c.init_mean is not None),
        ("time profile phi(t)", d.phi),
        ("B(t) = int_0^t phi", d.B),
        ("F0 (F = phi F0)", sp.sstr(d.F0.tolist())),
        ("D0 (G G^T = phi D0)", sp.sstr(d.D0.diagonal().tolist()[0])),
        ("kernel", d.kernel_path),
    ]
    if d.closed_form:
        K = len(p.components)
        rows += [(f"Phi[{i},{j}](r)", d.Phi[i, j]) for i in range(K) for j in range(K)]
        rows += [(f"Q[{i},{j}](r)", d.Q[i, j]) for i in range(K) for j in range(i, K)]
    rows += [
        ("  at", "r = B(t); mean Phi(r) u0, covariance Phi Sigma0 Phi^T + Q(r)"),
        ("weighting", p.weighting),
        ("t sampling", p.t_sampling + (" (q proportional to sum_k g_k^2 (Sigma_c^-1)_kk, tabulated)"
                                       if p.t_sampling == "importance" else "")),
        ("prior", "the kernel at T with the data term dropped"),
        ("[eps, T]", f"[{_number(p.eps)}, {_number(p.T)}]"),
        ("N (steps)", str(p.N)),
    ]
    return rows


def _importance_rows(d: Derivation) -> list[tuple[str, sp.Expr | str]]:
    imp = d.importance
    rows = [("importance density q(t)", imp.density), ("importance CDF Q(t)", imp.cdf)]
    if imp.inverse is None:
        return rows + [("importance inverse CDF", d.inverse_cdf_path)]
    if imp.by_log_snr:
        return rows + [("importance inverse CDF t(drop)", imp.inverse),
                       ("  at", "drop = u (logSNR(eps) - logSNR(T)), u ~ uniform(0, 1)")]
    return rows + [("importance inverse CDF t(u)", imp.inverse)]


def _named_integrals(rows, constants: set):
    """Each distinct integral (integrand and lower limit) as I(upper), I2(upper), ...: the rows with the
    integrals replaced, and one definition row per integral. An integral from a time up to a constant (T),
    a tail (derive/discretize.py: with_tail), is J(lower), J2(lower), ... . ``constants``: the parameters."""
    names, definitions, done = {}, [], []
    t, s = sp.Symbol("t"), sp.Symbol("s")
    for name, value in rows:
        if isinstance(value, sp.Basic):
            for integral in sorted(value.atoms(sp.Integral), key=sp.default_sort_key):
                if len(integral.limits) != 1 or len(integral.limits[0]) != 3:
                    continue
                var, lower, upper = integral.limits[0]
                tail = bool(lower.free_symbols - constants) and not (upper.free_symbols - constants)
                key = (integral.function.xreplace({var: s}), upper if tail else lower, tail)
                if key not in names:
                    count = sum(1 for k in names if k[2] == tail)
                    label = ("J" if tail else "I") + (f"{count + 1}" if count else "")
                    names[key] = sp.Function(label)
                    limits = (s, t, upper) if tail else (s, lower, t)
                    definitions.append((f"{label}(t) (numeric)", sp.Integral(key[0], limits)))
                value = value.xreplace({integral: names[key](lower if tail else upper)})
        done.append((name, value))
    return done + definitions


def show(d: Derivation | GeneralDerivation | CoupledDerivation, format: str = "text") -> str:
    """The derived quantities of `d` as a text table, a standalone LaTeX document or a Markdown table."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    title = f"sde {d.program.name} ({d.program.source.path})"
    if format == "text":
        rows = _readable_rows(d)
        width = max(len(name) for name, _ in rows)
        printer = _TextPrinter()
        return "\n".join([title] + [f"  {name.ljust(width)}  "
                                     f"{value if isinstance(value, str) else printer.doprint(stable(value))}"
                                     for name, value in rows])
    cells = latex_rows(d)
    if format == "markdown":
        return "\n".join([f"**{title}**", "", "| quantity | value |", "| --- | --- |"]
                          + [f"| ${_cell(name)}$ | ${_cell(value)}$ |" for name, value in cells])
    lines = [f"{name} &= {value}" for name, value in cells]
    return "\n".join(["% " + title, "\\documentclass{article}", "\\usepackage{amsmath}",
                      "\\usepackage[margin=1.5cm,landscape]{geometry}", "\\begin{document}", "\\begin{align*}",
                      " \\\\\n".join(lines), "\\end{align*}", "\\end{document}"])


def latex_rows(d) -> list[tuple[str, str]]:
    """(name, value) in LaTeX math for each row: what --format latex and markdown print."""
    printer = _LatexPrinter()
    return [(_latex_text(name), _latex_text(value) if isinstance(value, str) else printer.doprint(value))
            for name, value in _readable_rows(d)]


def _readable_rows(d) -> list[tuple[str, sp.Expr | str]]:
    # A numeric table's lookup reads as the formula it tabulates, with its integrals named below; every
    # quantity is written through the helpers the program names, which come first.
    expand = d.tables.expand if isinstance(d, Derivation) and d.tables else (lambda e: e)
    p = d.program
    helpers = [(f"{h.name}({h.argument}) (helper)", h.body.xreplace({p.t: sp.Symbol(h.argument)}))
               for h in p.helpers]
    rows = [(name, value if isinstance(value, str) else fold(expand(value), p.helpers, p.t))
            for name, value in _rows(d)]
    named = _named_integrals([(name, value if isinstance(value, str) else _decimals(plain_names(value)))
                              for name, value in helpers + rows], {prm.symbol for prm in p.params})
    return [(name, _rebuilt(value)) for name, value in named]


def _rebuilt(e):
    """e rebuilt with evaluation on. A table's formula is expanded unevaluated (its nested Integrals would
    be integrated numerically by SymPy's assumptions), which leaves constants such as cos(3*3)/3 - cos(9)/3
    standing; once the integrals are named I(t), evaluating is cheap and tidies them. Integral rows (the
    definitions) stay as they are."""
    if not isinstance(e, sp.Basic) or e.is_Atom or isinstance(e, sp.Integral):
        return e
    return e.func(*(_rebuilt(a) for a in e.args))


_LATEX_SPECIAL = str.maketrans({"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$",
                                "{": r"\{", "}": r"\}", "^": r"\^{}", "~": r"\~{}"})


def _cell(tex: str) -> str:
    """LaTeX math inside a Markdown table cell: a bar would end the cell, \\vert is the same symbol."""
    return tex.replace("|", r"\vert ")


def _latex_text(text: str) -> str:
    return r"\text{" + text.translate(_LATEX_SPECIAL) + "}"
