"""Stage 4: derivation -> the text of a standalone PyTorch module (templates/module.py.j2)."""
from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

import jinja2
import numpy as np
import sympy as sp

from ... import __version__
from ..derive import Derivation
from ..derive.coupled import R, CoupledDerivation
from ..derive.general import GeneralDerivation, reason
from ..derive.discretize import START
from ..derive.divergence import DIM
from ..derive.importance import DROP, U
from ..derive.symbolic import SIMPLIFY_LIMIT, Smaller, Tabulated, bounded, size
from ..derive.tables import BUILD_VARIABLE, Column, Total
from .fold import as_locals, fold
from .printer import REWRITE_LIMIT, Code, ConstantPool, ScalarPrinter, generate, stable

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
QUADRATURE_NODES = 48  # Gauss-Legendre nodes for the numeric path
MAX_FORMULA_SIZE = 120  # expression nodes shown in a docstring

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                          keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
_env.filters["pyrepr"] = repr  # a Python literal, for strings in the generated code


def class_name(sde_name: str) -> str:
    """vp -> VPSDE, cosine_vp -> CosineVPSDE: short parts upper-cased, as in VPSDE and VESDE."""
    parts = [p.upper() if len(p) <= 3 else p.capitalize() for p in sde_name.split("_") if p]
    return "".join(parts) + "SDE"


def _in_docstring(text: str) -> str:
    """Text that reads back as itself inside a triple-quoted docstring: backslashes and quotes escaped, and
    characters that a Python source cannot hold or would read as a line end (NUL, CR, lone surrogates, e.g.
    from a file name) written as escapes."""
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cs") and c != "\t" else c for c in text)


SUMMARY = "(a long expression with numeric integrals; see `sdelang show`)"


def _formula(expr: sp.Expr) -> str:
    """A one-line formula for a docstring; long numeric-path expressions are summarised."""
    if size(expr) > MAX_FORMULA_SIZE:
        return SUMMARY
    # An Integral up to T is a number to SymPy, which evaluates it by quadrature wherever a formula is rebuilt and a
    # factor's sign read: a beta with a removable 0/0 inside [eps, T] (a sinc bump) spent 10 s of its compile printing
    # its docstrings that way. Replaced first by a symbol that prints as the Integral, it is never evaluated.
    plain = _plain_symbols(expr)
    opaque = {e: sp.Symbol(sp.sstr(e.xreplace(plain))) for e in expr.atoms(sp.Integral) if not e.free_symbols}
    return sp.sstr(stable(expr.xreplace(opaque).xreplace(plain))).replace("**", "^")


def _number_integrals(expr: sp.Expr) -> int:
    """How many times an Integral with no free symbol (a number) occurs in expr."""
    return sum(1 for e in sp.preorder_traversal(expr) if isinstance(e, sp.Integral) and not e.free_symbols)


def head(variance: sp.Expr) -> sp.Expr:
    """The step variance from the head integral, int_0^t, where the module picks between it and the tail
    (derive/discretize.py: with_tail)."""
    return variance.args[3] if isinstance(variance, Smaller) else variance


def _tail_lookup(variance: sp.Expr) -> str | None:
    """'Tabulated(k, t)' for the tail W that the step variance reads (derive/discretize.py: with_tail); None without."""
    if not isinstance(variance, Smaller):
        return None
    tail, _, difference, _ = variance.args
    W = tail - difference   # r^2 W(s) - (r^2 W(s) - W(t)): the lookup W(t) itself
    return f"Tabulated({W.args[0]}, t)"


def plain_names(expr: sp.Expr) -> sp.Expr:
    """expr with its dummies (the step start, the dimension, u, drop) as plain symbols: _u -> u, and
    s -> s' beside a parameter called s."""
    return expr.xreplace(_plain_symbols(expr))


def _plain_symbols(expr: sp.Expr) -> dict[sp.Dummy, sp.Symbol]:
    """The plain symbol of each dummy in expr (plain_names)."""
    taken = {s.name for s in expr.free_symbols if not isinstance(s, sp.Dummy)}
    plain = {}
    # Two dummies may share a name (the step start s and an integration variable s): the module's own
    # symbols keep theirs, and integration variables, made in any order (some in a child process of the
    # time limit), get the primes.
    public = (START, U, DROP, DIM)
    for d in sorted(expr.atoms(sp.Dummy), key=lambda d: (d.name, d not in public, d.dummy_index)):
        name = d.name
        while name in taken:
            name += "'"
        taken.add(name)
        plain[d] = sp.Symbol(name)
    return plain


# The numeric tables (templates/_tables.j2, derive/tables.py).
TABLE_DEGREE = 16         # Chebyshev points per piece
TABLE_TOLERANCE = 1e-11   # the last two coefficients of a piece, relative to its values
TABLE_ROUNDS = 40         # halvings of the unresolved pieces
TABLE_MAX_PIECES = 4000


# Where the docstring of a module with numeric tables states what compiler/accuracy.py measured.
UNCHECKED = "Not checked against an independent solution."


def emit(d: Derivation | GeneralDerivation | CoupledDerivation) -> str:
    """The generated module's source text; the same derivation always gives the same bytes."""
    if isinstance(d, GeneralDerivation):
        return emit_general(d)
    if isinstance(d, CoupledDerivation):
        return emit_coupled(d)
    return emit_affine(d)


def _shared(p, pool: ConstantPool) -> dict:
    """What every template needs: the header, the parameters and the hoisted constants (call last:
    the constants are those the methods' code has put in the pool)."""
    scalar = ScalarPrinter({prm.symbol: f"self.{prm.name}" for prm in p.params})
    source_text = p.source.text
    return dict(
        version=__version__,
        source_name=_in_docstring(Path(p.source.path).name),
        source_sha256=hashlib.sha256(source_text.encode()).hexdigest(),
        source_lines=[_in_docstring(line.rstrip()) for line in source_text.rstrip("\n").splitlines()],
        name=p.name,
        class_name=class_name(p.name),
        params=[(prm.name, repr(float(prm.default)), bool(prm.symbol.is_positive)) for prm in p.params],
        N=p.N,
        constants=pool.lines(scalar.names),
        zero_divisors=_zero_divisors(p, pool, scalar),
        # Statements of a method body, placed at the start of the line that follows them.
        body=lambda c: "".join(f"        {line}\n" for line in c.lines),
    )


def _zero_divisors(p, pool: ConstantPool, scalar: ScalarPrinter) -> list[tuple[str, str, str, str]]:
    """(code, text, values, names) for each parameter-only divisor the module's forms have (pool.denominators):
    the constructor refuses parameters that make one 0 with a message, where the forms would divide by zero."""
    by_symbol = {prm.symbol: prm.name for prm in p.params}
    out = {}
    for den in pool.denominators:
        den = sp.factor_terms(den).as_coeff_Mul()[1]   # 99999 (g1 - g0) / 100000 and g1 - g0 are one check
        if den in out or not _can_vanish(den):
            continue
        names = [by_symbol[s] for s in sorted(den.free_symbols, key=lambda s: by_symbol[s])]
        out[den] = (scalar.doprint(den), sp.sstr(den), ", ".join(f"{n} = {{{n}!r}}" for n in names),
                    " and ".join(names) + (" in the program as a constant" if len(names) == 1 else
                                           " in the program as constants"))
    return list(out.values())


def _can_vanish(den: sp.Expr) -> bool:
    """Whether a divisor polynomial in the parameters can be 0 where their assumptions allow: theta - 1 can for a
    positive theta, theta + 1 cannot. Other divisors (a normaliser Z = logSNR(eps) - logSNR(T), cos(pi s / (2 (s +
    1)))) are left to the checks of the SDE itself: an SDE that is not degenerate keeps them away from 0."""
    symbols = den.free_symbols
    if not den.is_polynomial(*symbols):
        return False
    if len(symbols) > 1:
        return True
    roots = bounded(sp.solve, den, *symbols, seconds=SIMPLIFY_LIMIT)
    return roots is None or bool(roots)   # a positive symbol's solve keeps positive roots only


# Names a method of a generated module uses for itself, which a helper's local must not take.
METHOD_NAMES = frozenset({"self", "torch", "math", "x", "t", "s", "u", "y", "a", "b", "r", "f", "g", "G", "G2", "z",
                          "drift", "scale", "rev_f", "rev_G", "mean", "std", "batch", "eps"})


def _through_helpers(p, pool: ConstantPool, names: dict, *exprs: sp.Expr) -> Code:
    """Code for a method whose expressions the user wrote through helpers (the drift and the diffusion):
    each helper it uses is a local of its own name, beta = ..., as in the source."""
    folded, helpers = as_locals(list(exprs), p.helpers, p.t, METHOD_NAMES | set(names.values()))
    return generate(folded, pool, names, helpers)


def emit_general(d: GeneralDerivation) -> str:
    """A module for an SDE without a Gaussian kernel (templates/general.py.j2)."""
    p = d.program
    names = {p.t: "t", p.x: "x"}
    names.update({prm.symbol: f"self.{prm.name}" for prm in p.params})
    pool = ConstantPool(frozenset(prm.symbol for prm in p.params))

    def code(*exprs: sp.Expr) -> Code:
        return generate(list(exprs), pool, names)

    methods = {
        "sde": _through_helpers(p, pool, names, p.drift, p.diffusion),
        "gradient": code(d.noise_gradient),
        "prior": code(d.prior_mean, d.prior_variance),
        "weight": code(d.weight),
        "divergence": code(d.divergence),
    }
    settings = code(p.eps, p.T, p.v0)
    context = dict(
        _shared(p, pool),
        m=methods,
        settings=settings,
        kernel_path=d.kernel_path,
        inverse_cdf_path=d.inverse_cdf_path,
        weighting=p.weighting,
        reason=reason(p),
        unavailable=sorted(d.unavailable.items()),
        f=dict(drift=_formula(fold(p.drift, p.helpers, p.t)), g2=_formula(fold(d.g2, p.helpers, p.t)), gradient=_formula(d.noise_gradient),
               weight=_formula(d.weight), prior_mean=_formula(d.prior_mean),
               prior_variance=_formula(d.prior_variance), divergence=_formula(d.divergence)),
    )
    return _env.get_template("general.py.j2").render(**context)


def _matrix_code(rows) -> str:
    """((a, b), (c, d)) -> "((a, b), (c, d))" for constants already printed."""
    return "(" + ", ".join("(" + ", ".join(row) + ",)" for row in rows) + ",)"


def emit_coupled(d: CoupledDerivation) -> str:
    """A module for a coupled linear SDE (templates/coupled.py.j2)."""
    p = d.program
    comps = p.components
    K = len(comps)
    names = {p.t: "t", R: "r"}
    names.update({prm.symbol: f"self.{prm.name}" for prm in p.params})
    pool = ConstantPool(frozenset(prm.symbol for prm in p.params))

    def code(*exprs: sp.Expr) -> Code:
        return generate(list(exprs), pool, names)

    def constants(matrix: sp.Matrix) -> str:
        # One entry at a time: CSE across entries would name a repeated coefficient (-beta twice) in a
        # statement that a literal has no place for.
        entries = [code(e) for e in matrix]
        assert all(c.constant[0] and not c.lines for c in entries), "F0, D0 and the initial law hold parameters only"
        flat = [c.results[0] for c in entries]
        return _matrix_code([flat[i * matrix.cols:(i + 1) * matrix.cols] for i in range(matrix.rows)])

    transition = code(*d.Phi, *d.Q) if d.closed_form else None
    methods = {"profile": code(d.phi), "time_change": code(d.B)}
    noisy = d.noisy
    order = [i for i in range(K) if not noisy[i]] + [i for i in range(K) if noisy[i]]
    settings = code(p.eps, p.T)
    uses_quadrature = any("self._quad(" in line for c in methods.values() for line in (*c.lines, *c.results))
    nodes, weights = np.polynomial.legendre.leggauss(QUADRATURE_NODES)
    F0, D0 = constants(d.F0), constants(d.D0)
    mean0, Sigma0 = constants(d.mean0.T), constants(d.Sigma0)
    context = dict(
        _shared(p, pool),
        K=K,
        components=[c.name for c in comps],
        data_index=p.data,
        data_name=comps[p.data].name,
        noisy=list(noisy),
        order=order,
        first_noisy=noisy.count(False),
        settings=settings,
        m=methods,
        transition=transition,
        F0=F0, D0=D0, mean0=mean0, Sigma0=Sigma0,
        kernel_path=d.kernel_path,
        inverse_cdf_path=d.inverse_cdf_path,
        weighting=p.weighting,
        t_sampling=p.t_sampling,
        uses_quadrature=uses_quadrature,
        quadrature_nodes=[repr(float(x)) for x in nodes],
        quadrature_weights=[repr(float(w)) for w in weights],
        init=[(c.name, _formula(c.init_mean), _formula(c.init_variance)) for c in comps if c.init_mean is not None],
        f=dict(
            lines=[f"d{c.name} = ({_formula(c.drift)}) dt" + (f" + {_formula(c.diffusion)} dw" if c.diffusion != 0 else "")
                   for c in comps],
            phi=_formula(d.phi), B=_formula(d.B), F0=sp.sstr(d.F0.tolist()), D0=sp.sstr(d.D0.diagonal().tolist()[0]),
            Phi=[[_formula(plain_names(e)) for e in row] for row in d.Phi.tolist()] if d.closed_form else None,
            Q=[[_formula(plain_names(e)) for e in row] for row in d.Q.tolist()] if d.closed_form else None,
        ),
    )
    return _env.get_template("coupled.py.j2").render(**context)


def _kink_arguments(d: Derivation) -> list[sp.Expr]:
    """The arguments u(t) of abs and sign in the SDE's coefficients, its kernel and its table columns: where one crosses
    0 they have a kink or a jump. The module finds those times at construction (the parameters move them): its table
    builder places a piece boundary there, and the runtime's ODE solves land on them (kink_times)."""
    t = d.program.t
    exprs = [d.a, d.b, d.g2, d.kernel.m, d.kernel.c, d.kernel.v]
    exprs += [spec.expr.xreplace({BUILD_VARIABLE: t}) for spec in d.tables.columns] if d.tables else []
    return sorted({f.args[0] for e in exprs for f in e.atoms(sp.Abs, sp.sign)
                   if f.args[0].has(t) and not f.args[0].has(Column, Total, Tabulated, sp.Integral)},
                  key=sp.default_sort_key)


def _tables_context(d: Derivation, pool: ConstantPool, names: dict) -> dict | None:
    """What templates/_tables.j2 needs: the columns' code and the builder's arguments."""
    tables = d.tables
    if not tables:
        return None
    build_names = dict(names)
    build_names[BUILD_VARIABLE] = "t"
    columns, lowers, floors = [], [], []
    for j, spec in enumerate(tables.columns):
        code = generate([spec.expr], pool, build_names)
        floors.append("1.0" if spec.absolute else "0.0")
        if spec.kind == "value":
            describe = f"stored column {tables.stored.index(j)}: {spec.name}"
            lowers.append("None")
        elif spec.kind == "tail":
            describe = "integrand of an integral from t up to T"
            lowers.append("None")
        else:
            bound = generate([spec.lower], pool, names)
            describe = f"integrand of an integral from {_formula(spec.lower)}"
            lowers.append(bound.results[0])
        columns.append(dict(code=code, describe=describe))
    definitions = [f"Tabulated({k}, t) = {spec.name} = {_formula(plain_names(spec.definition))}"
                   for k, spec in enumerate(tables.columns[j] for j in tables.stored)]
    if tables.inverse is not None:
        definitions.append(f"t_icdf(u) = exp(a table of log t over u in [0, 1]) inverting "
                           f"Tabulated({tables.inverse}, t)")
    return dict(
        columns=columns,
        lowers="(" + ", ".join(lowers) + ",)",
        tails="(" + ", ".join(map(str, tables.tails)) + ",)" if tables.tails else None,
        floors="(" + ", ".join(floors) + ",)",
        stored="(" + ", ".join(map(str, tables.stored)) + ",)",
        inverse=tables.inverse,
        definitions=definitions,
        summary=(f"piecewise Chebyshev series ({TABLE_DEGREE} points a piece) built when the module is "
                 f"constructed, pieces halved until resolved to {TABLE_TOLERANCE:g}:"),
        report=UNCHECKED,
    )


def emit_affine(d: Derivation) -> str:
    p = d.program
    t = p.t
    names = {t: "t", p.x: "x", START: "s", U: "u", DROP: "drop", DIM: "d"}
    names.update({prm.symbol: f"self.{prm.name}" for prm in p.params})
    pool = ConstantPool(frozenset(prm.symbol for prm in p.params))
    imp = d.importance
    k = d.kernel
    uniform = p.t_sampling == "uniform"

    def code(*exprs: sp.Expr) -> Code:
        return generate(list(exprs), pool, names)

    lsnr_eps, lsnr_T = d.log_snr.xreplace({t: p.eps}), d.log_snr.xreplace({t: p.T})
    methods = {
        "sde": _through_helpers(p, pool, names, d.a, d.b, p.diffusion),
        "diffusion": _through_helpers(p, pool, names, p.diffusion),
        "mean_coeff": code(k.m),
        "mean_offset": code(k.c),
        "std": code(k.std),
        "log_snr": code(d.log_snr),
        "prior": code(d.prior_mean, d.prior_variance),
        "discretize": code(d.step.growth, d.step.offset, d.step.variance),
        "weight": code(d.weight),
        "t_density": code(1 / (p.T - p.eps) if uniform else imp.density),
        # The per-dimension divergence; the template multiplies by d = x[0].numel().
        "divergence": code(d.divergence / DIM),
    }
    if uniform:
        methods["t_cdf"] = code((t - p.eps) / (p.T - p.eps))
        methods["t_icdf"] = code(p.eps + U * (p.T - p.eps))
    else:
        methods["t_cdf"] = code(imp.cdf)
        if imp.by_log_snr:
            methods["log_snr_bounds"] = code(lsnr_eps, lsnr_T)
        if imp.inverse is not None:
            methods["t_icdf"] = code(imp.inverse)
    numeric_inverse = not uniform and imp.inverse is None
    settings = code(p.eps, p.T, p.v0)
    tables = _tables_context(d, pool, names)
    kinks = _kink_arguments(d)

    def written(expr: sp.Expr) -> sp.Expr:
        return fold(expr, p.helpers, p.t)

    def formula(expr: sp.Expr) -> str:
        # Table lookups in a docstring read as the formulas they stand for, built unevaluated and in
        # bounded time: evaluating a product with nested Integrals makes SymPy integrate them numerically.
        if not expr.has(Tabulated, Total):
            return _formula(expr)
        if size(expr) + sum(size(spec.expr) for spec in d.tables.columns) > MAX_FORMULA_SIZE:
            return SUMMARY
        expanded = bounded(d.tables.expand, expr, seconds=REWRITE_LIMIT)
        if expanded is None or _number_integrals(expanded) > 1:
            # Integrals over fixed limits (columns at eps and T) are numbers to SymPy, which integrates them by
            # quadrature to order and sign the terms it prints, at rising precision where they nearly cancel: the
            # density of a VP whose beta has no antiderivative took 1.2 s to print.
            return SUMMARY
        return _formula(expanded)

    scalar = ScalarPrinter({prm.symbol: f"self.{prm.name}" for prm in p.params})
    context = dict(
        _shared(p, pool),
        table_constants=pool.lines(scalar.names, tables=True),
        tables=tables,
        kinks=code(*kinks) if kinks else None,
        degree=TABLE_DEGREE,
        tolerance=f"{TABLE_TOLERANCE:g}",
        rounds=TABLE_ROUNDS,
        max_pieces=TABLE_MAX_PIECES,
        settings=settings,
        m=methods,
        b_is_zero=d.b == 0,
        c_is_zero=k.c == 0,
        m_is_one=k.m == 1,
        uniform=uniform,
        by_log_snr=imp.by_log_snr and not uniform,
        numeric_inverse=numeric_inverse,
        kernel_path=d.kernel_path,
        inverse_cdf_path=d.inverse_cdf_path,
        weighting=p.weighting,
        t_sampling=p.t_sampling,
        f=dict(
            a=formula(written(d.a)), b=formula(written(d.b)), g=formula(written(p.diffusion)), g2=formula(written(d.g2)), m=formula(k.m),
            c=formula(k.c), v=formula(k.v), std=formula(k.std), log_snr=formula(d.log_snr),
            weight=formula(d.weight), density=formula(imp.density), cdf=formula(imp.cdf),
            inverse="eps + u * (T - eps)" if uniform else formula(imp.inverse) if imp.inverse is not None else None,
            prior_mean=formula(d.prior_mean), prior_variance=formula(d.prior_variance),
            eps=formula(p.eps), T=formula(p.T), v0=formula(p.v0),
            step_variance=formula(head(d.step.variance)), step_tail=_tail_lookup(d.step.variance),
        ),
    )
    return _env.get_template("module.py.j2").render(**context)
