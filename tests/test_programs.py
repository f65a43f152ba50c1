"""Random valid programs: each parses, checks, compiles, imports and obeys the kernel's ODEs.

The strategy writes programs the way a user would: random names (some starting
with a keyword, to exercise the lexer), parameters, constants and helpers of t,
an affine drift a(t) x + b(t) written in one of several equivalent forms, a
diffusion that is positive on [eps, T] by construction, optional settings,
comments, blank lines, line continuations and a shuffled statement order.

A second property checks the parser and the lowering to SymPy on random
arithmetic text against SymPy's own parser of the same text.
"""
from __future__ import annotations

import keyword
import math
import re
import types
from dataclasses import dataclass

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sdelang
from sdelang.compiler.check import check
from sdelang.compiler.check.common import SHADOWED_MODULES
from sdelang.compiler.parse import parse

# Names a program may not use, and names whose collision with generated code is
# a known bug (see test_parameter_names_that_collide_with_generated_code).
LANGUAGE_WORDS = {"sde", "param", "steps", "v0", "prior", "weighting", "dt", "dw", "in", "normal", "kernel",
                  "likelihood", "score_matching", "uniform", "importance", "t", "pi", "exp", "log", "sqrt",
                  "sin", "cos", "tan", "tanh", "sinh", "cosh", "atan", "abs", "log1p", "expm1", "sigmoid",
                  "softplus"}
GENERATED_NAMES = {"self", "N", "T", "eps", "math", "torch", "float", "int"} | {
    name for name in dir(torch.nn.Module) if not name.startswith("__")} | {
    "sde", "diffusion", "marginal_prob", "mean_coeff", "mean_offset", "std", "log_snr", "weight", "t_density",
    "t_cdf", "t_icdf", "sample_t", "drift_divergence", "discretize", "reverse", "prior_sampling", "prior_logp",
    "kernel_path", "inverse_cdf_path", "t_sampling"}
FORBIDDEN = LANGUAGE_WORDS | GENERATED_NAMES | set(keyword.kwlist) | set(keyword.softkwlist)

EXAMPLES_FAST = 6  # compiling takes 1-10 s a program; the slow run below draws more

# -- names -------------------------------------------------------------------

# Prefixes that are keywords of the language: 'dtx', 'sde1', 'in_' must lex as names.
_PREFIXES = ["", "", "", "dt", "dw", "sde", "param", "in", "steps", "v0", "prior", "exp", "pi", "x", "t"]


def names() -> st.SearchStrategy[str]:
    tail = st.text("abcdefghjkmnopqrsuvz0123456789_", min_size=1, max_size=5)
    head = st.sampled_from("abcfghjklmnpqrsuvwyz")
    plain = st.builds(lambda h, r: h + r, head, st.text("abcdefghkmnopqrsuvz0123456789_", max_size=5))
    prefixed = st.builds(lambda p, r: p + r, st.sampled_from(_PREFIXES), tail).filter(lambda s: s[0].isalpha())
    return st.one_of(plain, prefixed).filter(lambda s: s not in FORBIDDEN and not s.startswith("_"))


# -- programs ----------------------------------------------------------------


@dataclass(frozen=True)
class RandomProgram:
    text: str
    name: str
    params: dict[str, float]
    eps: float
    T: float
    N: int
    weighting: str            # likelihood, score_matching or custom
    weighting_text: str | None
    t_sampling: str

    def __str__(self) -> str:  # Hypothesis prints the failing example with this
        return self.text


def _number(value: float) -> st.SearchStrategy[str]:
    """Ways of writing a positive number."""
    forms = [repr(value), f"{value:g}", f"{value * 10:g}e-1", f"{value * 100:g} / 100"]
    if value < 1:
        forms.append(f"{value:g}".lstrip("0") or "0")
    return st.sampled_from(forms)


POSITIVE = st.sampled_from([0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0])


@st.composite
def programs(draw) -> RandomProgram:
    used: set[str] = set()

    def fresh(module_name: bool = False) -> str:
        name = draw(names().filter(lambda s: s not in used and not (module_name and s.lower() in SHADOWED_MODULES)))
        used.add(name)
        return name

    sde_name, state = fresh(module_name=True), fresh()
    statements: list[str] = [f"sde {sde_name}"]
    params: dict[str, float] = {}

    def param() -> str:
        name, value = fresh(), draw(POSITIVE)
        params[name] = value
        statements.append(f"param {name} = {draw(_number(value))}")
        return name

    def coefficient() -> str:
        """A positive constant: a number, a parameter or a named constant."""
        kind = draw(st.sampled_from(["number", "param", "param", "constant"]))
        if kind == "number":
            return draw(_number(draw(POSITIVE)))
        if kind == "param":
            return draw(st.sampled_from(sorted(params))) if params and draw(st.booleans()) else param()
        name, inner = fresh(), coefficient()
        statements.append(f"{name} = {draw(st.sampled_from([f'2 * {inner}', f'{inner} / 2', f'log1p({inner})', f'sqrt({inner})', f'{inner}^2']))}")
        return name

    # The interval: T <= 2 keeps exp(k t) and the kernel well inside float32's range.
    eps_text, eps = draw(st.sampled_from([("1e-5", 1e-5), ("1e-3", 1e-3), (".01", 0.01), ("0.001", 1e-3)]))
    T = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0]))
    interval = draw(st.sampled_from(["default", "numbers", "param"]))
    if interval == "default":
        eps, T = 1e-5, 1.0
    elif interval == "numbers":
        statements.append(f"t in [{eps_text}, {T:g}]")
    else:
        name = fresh()
        params[name] = T
        statements.append(f"param {name} = {T:g}")
        statements.append(f"t in [{eps_text}, {name}]")

    # The rate r(t) > 0 of the drift a(t) = -r(t) (or a small growth, a = +k).
    rate_kind = draw(st.sampled_from(["zero", "const", "linear", "growth"]))
    helper_rate = None
    if rate_kind == "const":
        rate = coefficient()
    elif rate_kind == "linear":
        helper_rate, lo, hi = fresh(), coefficient(), coefficient()
        statements.append(f"{helper_rate}(t) = {lo} + t * {hi}")
        rate = f"{helper_rate}(t)"
    elif rate_kind == "growth":
        rate = f"-{draw(st.sampled_from(['0.5', '1/4', '0.1']))}"
    else:
        rate = None
    offset = coefficient() if rate is not None and draw(st.booleans()) else None
    x = state
    if rate is None:
        drift = None
    elif offset is None:
        drift = draw(st.sampled_from([f"-({rate}) * {x}", f"-{x} * ({rate})", f"-1/2 * ({rate}) * {x}"]))
    else:
        drift = draw(st.sampled_from([f"-({rate}) * ({x} - {offset})", f"{offset} * ({rate}) - ({rate}) * {x}",
                                      f"-({rate}) * {x} + {offset}"]))

    # The diffusion, positive on (0, T] by construction.
    g_kind = draw(st.sampled_from(["number", "sqrt_rate", "sqrt_linear", "exp", "ve", "sqrt_t"]))
    if g_kind == "number":
        diffusion = coefficient()
    elif g_kind == "sqrt_rate" and helper_rate is not None:
        diffusion = f"sqrt({helper_rate}(t))"
    elif g_kind == "exp":
        diffusion = f"{coefficient()} * exp({draw(st.sampled_from(['t', '-t', 't / 2']))})"
    elif g_kind == "ve":
        sigma, lo, k = fresh(), coefficient(), draw(st.sampled_from(["1", "2", "1/2"]))
        statements.append(f"{sigma}(t) = {lo} * exp({k} * t)")
        diffusion = f"sqrt(d/dt({sigma}(t)^2))"
    elif g_kind == "sqrt_t":
        diffusion = f"sqrt({coefficient()} * t)"
    else:
        diffusion = f"sqrt({coefficient()} + {coefficient()} * t^2)"
    sde_line = f"d{x} = {drift} dt + {diffusion} dw" if drift is not None else f"d{x} = {diffusion} dw"
    statements.append(sde_line)

    N = 1000
    if draw(st.booleans()):
        N = draw(st.integers(1, 2000))
        statements.append(f"steps {N}")
    if draw(st.booleans()):
        statements.append(f"v0 = {draw(st.sampled_from(['0', '0.01', '1e-4']))}")
    prior = draw(st.sampled_from(["none", "kernel", "normal"]))
    if prior == "kernel":
        statements.append("prior kernel")
    elif prior == "normal":
        statements.append(f"prior normal({draw(st.sampled_from(['0', '-1', '1/2']))}, {coefficient()})")
    weighting, weighting_text = draw(st.sampled_from(["likelihood", "score_matching", "custom", "none"])), None
    if weighting == "custom":
        weighting_text = draw(st.sampled_from(
            ["1 + t", "exp(-t)", "sigmoid(t)", "softplus(t - 1)", "cosh(t) * 2", "abs(sin(t)) + 1",
             "1 / (1 + t^2)", "d/dt(t^2 + t)", "(1 + t)^-1", "2^-t"]))
        statements.append(f"weighting {weighting_text}")
    elif weighting != "none":
        statements.append(f"weighting {weighting}")
    else:
        weighting = "likelihood"
    t_sampling = draw(st.sampled_from(["uniform", "importance", "none"]))
    if t_sampling != "none":
        statements.append(f"t ~ {t_sampling}")
    else:
        t_sampling = "uniform"

    order = draw(st.permutations(statements))
    lines: list[str] = []
    for statement in order:
        for _ in range(draw(st.integers(0, 1))):
            lines.append(draw(st.sampled_from(["", "# a comment", "   ", "#", "  # indented comment"])))
        if draw(st.integers(0, 5)) == 0 and " + " in statement:
            statement = statement.replace(" + ", " \\\n    + ", 1)
        if draw(st.integers(0, 3)) == 0:
            statement += "   # trailing comment, t in [0, 1]"
        lines.append(statement)
    text = "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"]))
    return RandomProgram(text, sde_name, params, eps, T, N, weighting, weighting_text, t_sampling)


# -- running the generated module -------------------------------------------


def import_code(code: str, name: str = "generated_sde") -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(code, f"<{name}>", "exec"), module.__dict__)
    return module


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    scale = expected.abs().max().clamp(min=1e-30)
    assert torch.allclose(actual, expected, rtol=rtol, atol=rtol * scale), (
        f"{what}: {actual.tolist()} != {expected.tolist()}")


def check_module(sde: torch.nn.Module, prog: RandomProgram) -> None:
    """Shapes, finiteness and the kernel's moment ODEs on a grid of t in [eps, T]."""
    assert math.isclose(sde.eps, prog.eps, rel_tol=1e-12) and math.isclose(sde.T, prog.T, rel_tol=1e-12)
    assert sde.N == prog.N
    B = 7
    t = torch.linspace(prog.eps, prog.T, B, dtype=torch.float64)
    x = torch.randn(B, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def finite(value, shape, what):
        value = torch.as_tensor(value)
        assert value.shape == shape, f"{what}: shape {tuple(value.shape)}, expected {shape}"
        assert torch.isfinite(value).all(), f"{what} is not finite: {value.tolist()}"
        return value

    drift, g = sde.sde(x, t)
    finite(drift, x.shape, "drift")
    assert (finite(g, (B,), "g") > 0).all()
    mean, std = sde.marginal_prob(x, t)
    finite(mean, x.shape, "mean")
    assert (finite(std, (B,), "marginal std") > 0).all()
    _close(sde.std(t), std, 1e-9, "std vs marginal_prob")
    _close(sde.diffusion(t), g, 1e-9, "diffusion vs sde")
    m, c = finite(sde.mean_coeff(t), (B,), "m"), finite(sde.mean_offset(t), (B,), "c")
    _close(mean, m[:, None, None] * x + c[:, None, None], 1e-9, "mean = m x0 + c")
    _close(finite(sde.log_snr(t), (B,), "logSNR"), torch.log(m**2 / std**2), 1e-7, "logSNR = log(m^2 / v)")
    assert (finite(sde.weight(t), (B,), "weight") > 0).all()
    assert (finite(sde.t_density(t), (B,), "t_density") > 0).all()
    cdf = finite(sde.t_cdf(t), (B,), "t_cdf")
    assert (cdf >= -1e-9).all() and (cdf <= 1 + 1e-9).all() and (cdf.diff() >= -1e-9).all(), cdf
    u = torch.linspace(0.05, 0.95, B, dtype=torch.float64)
    ts = finite(sde.t_icdf(u), (B,), "t_icdf")
    assert ((ts >= prog.eps) & (ts <= prog.T)).all()
    _close(sde.t_cdf(ts), u, 1e-5, "t_cdf(t_icdf(u)) = u")
    drawn = finite(sde.sample_t(5, generator=torch.Generator().manual_seed(1)), (5,), "sample_t")
    assert ((drawn >= prog.eps) & (drawn <= prog.T)).all()
    z = finite(sde.prior_sampling((B, 2, 3), generator=torch.Generator().manual_seed(2)), (B, 2, 3), "prior")
    finite(sde.prior_logp(z), (B,), "prior_logp")
    f, G = sde.discretize(x, t)
    finite(f, x.shape, "discretize f")
    assert (finite(G, (B,), "discretize G") >= 0).all()
    for flow in (False, True):
        reverse = sde.reverse(lambda y, s: -y, probability_flow=flow)
        finite(reverse.sde(x, t)[0], x.shape, "reverse drift")
        finite(reverse.discretize(x, t)[0], x.shape, "reverse step")

    # a(t) and b(t) read back from the drift; then m' = a m, c' = a c + b, v' = 2 a v + g^2.
    ones = torch.ones(B, 1, dtype=torch.float64)
    b = sde.sde(torch.zeros_like(ones), t)[0][:, 0]
    a = sde.sde(ones, t)[0][:, 0] - b
    _close(finite(sde.drift_divergence(x, t), (B,), "divergence"), 6 * a, 1e-9, "div f = d a")
    tg = t.clone().requires_grad_(True)
    m, c, v = sde.mean_coeff(tg), sde.mean_offset(tg), sde.std(tg) ** 2
    dm, dc, dv = (torch.autograd.grad(q.sum(), tg, allow_unused=True)[0] if q.requires_grad else None
                  for q in (m, c, v))
    dm, dc, dv = (torch.zeros_like(t) if d is None else d for d in (dm, dc, dv))
    m, c, v = m.detach(), c.detach(), v.detach()
    _close(dm, a * m, 1e-6, "m' = a m")
    _close(dc, a * c + b, 1e-5, "c' = a c + b")
    _close(dv, 2 * a * v + g**2, 1e-5, "v' = 2 a v + g^2")


def _sympify(text: str, t: sp.Symbol, functions: dict | None = None) -> sp.Expr:
    """SymPy's reading of the same text: an independent parser."""
    local = {"t": t, "log1p": lambda u: sp.log(1 + u), "expm1": lambda u: sp.exp(u) - 1,
             "sigmoid": lambda u: 1 / (1 + sp.exp(-u)), "softplus": lambda u: sp.log(1 + sp.exp(u)),
             "abs": sp.Abs, **(functions or {})}
    text = re.sub(r"d/dt\(", "ddt(", text).replace("^", "**")
    local["ddt"] = lambda e: sp.diff(e, t)
    return sp.parse_expr(text, local_dict=local)


def _compile_and_check(prog: RandomProgram) -> None:
    compiled = sdelang.compile_source(sdelang.Source(prog.text, f"{prog.name}.sde"))
    assert compiled.name == prog.name
    derivation = compiled.derivation
    assert derivation.program.weighting == prog.weighting
    assert derivation.program.t_sampling == prog.t_sampling
    assert {p.name: p.default for p in derivation.program.params} == prog.params
    module = import_code(compiled.code)
    sde = module.SDE()
    assert isinstance(sde, torch.nn.Module)
    check_module(sde, prog)
    if prog.weighting_text is not None:
        # The custom weighting as lowered, and as printed into torch, against SymPy's parse of the text.
        t = derivation.program.t
        expected = _sympify(prog.weighting_text, t)
        grid = np.linspace(prog.eps, prog.T, 5)
        for value in grid:
            assert math.isclose(float(derivation.weight.subs(t, value)), float(expected.subs(t, value)),
                                rel_tol=1e-12)
        weights = sde.weight(torch.tensor(grid, dtype=torch.float64))
        np.testing.assert_allclose(weights.numpy(), [float(expected.subs(t, v)) for v in grid], rtol=1e-10)


@settings(max_examples=EXAMPLES_FAST, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs())
def test_random_programs_compile_and_run(prog):
    _compile_and_check(prog)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs())
def test_random_programs_compile_and_run_many(prog):
    _compile_and_check(prog)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(programs())
def test_random_programs_parse_and_check(prog):
    """The cheap stages, on more programs: the generator only writes valid programs."""
    program = check(parse(sdelang.Source(prog.text, "random.sde")), sdelang.Source(prog.text, "random.sde"))
    assert program.name == prog.name and program.N == prog.N
    assert {p.name for p in program.params} == set(prog.params)


# -- the parser and lowering against SymPy's parser --------------------------


@st.composite
def expressions(draw, depth: int = 3) -> str:
    """Arithmetic text in t: numbers, t, pi, + - * / ^ **, unary signs, parentheses, builtins, d/dt."""
    leaf = st.sampled_from(["t", "t", "2", "3", "0.5", ".25", "1e-1", "2.5E0", "pi", "1/3", "7"])
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(leaf)
    kind = draw(st.sampled_from(["bin", "bin", "bin", "neg", "pos", "pow", "call", "paren", "ddt"]))
    sub = expressions(depth - 1)
    if kind == "bin":
        op = draw(st.sampled_from(["+", "-", "*", "/"]))
        space = draw(st.sampled_from([" ", ""]))
        return f"{draw(sub)}{space}{op}{space}{draw(sub)}"
    if kind == "neg":
        return f"-{draw(sub)}"
    if kind == "pos":
        return f"+{draw(sub)}"
    if kind == "pow":
        # Small exponents keep the values representable; right associativity is exercised by a^b^c.
        exponent = draw(st.sampled_from(["2", "-1", "1/2", "t", "-t", "2^-1", "3^1^2", "(1/2)"]))
        return f"{draw(sub)}{draw(st.sampled_from(['^', '**', ' ^ ']))}{exponent}"
    if kind == "call":
        func = draw(st.sampled_from(["exp", "log", "sqrt", "sin", "cos", "tan", "tanh", "sinh", "cosh", "atan",
                                     "abs", "log1p", "expm1", "sigmoid", "softplus"]))
        return f"{func}({draw(sub)})"
    if kind == "ddt":
        return f"d/dt({draw(sub)})"
    return f"({draw(sub)})"


GRID = np.linspace(1e-5, 1, 257)  # the checker's own grid for the default interval


def _finite_on_grid(expr: sp.Expr, t: sp.Symbol) -> bool:
    fn = sp.lambdify(t, expr, modules="numpy")
    with np.errstate(all="ignore"):
        try:
            values = np.asarray(fn(GRID), dtype=complex) * np.ones_like(GRID)
        except (ZeroDivisionError, OverflowError, TypeError, ValueError):
            return False
    return bool(np.all(np.isfinite(values)) and np.all(np.abs(values.imag) <= 1e-12 * (1 + np.abs(values.real))))


def _agree(lowered: sp.Expr, expected: sp.Expr, t: sp.Symbol, points) -> None:
    for value in points:
        a = complex(sp.N(lowered.subs(t, value), 30))
        b = complex(sp.N(expected.subs(t, value), 30))
        assert abs(a - b) <= 1e-9 * (1 + abs(b)), f"at t = {value}: lowered {a}, SymPy {b}"


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much])
@given(expressions(), st.sampled_from(["drift", "helper", "helper2"]))
def test_lowering_matches_sympy_parser(text, where):
    """The text as a drift offset b(t), or inside a helper called with another argument, lowers like SymPy reads it."""
    t = sp.Symbol("t", positive=True)
    if where == "drift":
        program_text = f"sde roundtrip\ndx = {text} dt + 1 dw\n"
        expected = _sympify(text, t)
    elif where == "helper":
        program_text = f"sde roundtrip\nh(t) = {text}\ndx = h(t) dt + 1 dw\n"
        expected = _sympify(text, t)
    else:  # a helper whose argument is not t, called at 2 * t: inlining substitutes the argument
        assume("d/dt" not in text)
        body = re.sub(r"\bt\b", "u", text)
        program_text = f"sde roundtrip\nh(u, k) = k * ({body})\ndx = h(t / 2, 3) dt + 1 dw\n"
        expected = 3 * _sympify(text, t).subs(t, t / 2)
    assume(expected.is_finite is not False and _finite_on_grid(expected, t))
    source = sdelang.Source(program_text, "roundtrip.sde")
    program = check(parse(source), source)
    lowered = program.drift.subs(program.t, t)
    _agree(lowered, expected, t, GRID[::64])


# -- names the generated code needs for itself -----------------------------

COLLIDING_NAMES = ["N", "self", "T", "eps", "std", "weight", "sde", "math", "torch", "float", "lambda", "class",
                   "_k0", "training", "to", "cuda", "max", "v0"]


@pytest.mark.parametrize("name", ["theta", "match"] + COLLIDING_NAMES)
def test_parameter_names_that_collide_with_generated_code(name):
    """A parameter must either work or be refused with an SdeError naming it; never a broken or wrong module."""
    text = f"sde collide\nparam {name} = 2\ndx = -{name} * x dt + 1 dw\n"
    try:
        compiled = sdelang.compile_source(sdelang.Source(text, "collide.sde"))
    except sdelang.SdeError as exc:
        assert name in COLLIDING_NAMES, f"'{name}' is a fine parameter name but was refused: {exc}"
        assert f"'{name}'" in str(exc)
        return
    sde = import_code(compiled.code).SDE().eval()
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    x = torch.ones(3, 2, dtype=torch.float64)
    np.testing.assert_allclose(sde.sde(x, t)[0].numpy(), -2 * x.numpy())
    np.testing.assert_allclose(sde.std(t).numpy(), np.sqrt(-np.expm1(-4 * t.numpy()) / 4), rtol=1e-10)
    np.testing.assert_allclose(sde.weight(t).numpy(), np.ones(3))
    assert sde.eps == 1e-5 and sde.T == 1 and sde.N == 1000
    assert getattr(sde, name) == 2.0


def test_a_name_that_starts_with_dt_after_d_slash_is_a_division():
    """d/dt2 and d/dtheta(t) divide d by the constant dt2 and the helper dtheta: the lexer once read 'd/dt' out of
    them as the derivative operator and refused the line ("unexpected '2'; expected '('")."""
    text = "sde ratio\nd = 3\ndt2 = 2\ndtheta(t) = 1 + t\ndx = -(d/dt2 + d/dtheta(t)) * x dt + dw\n"
    source = sdelang.Source(text, "ratio.sde")
    program = check(parse(source), source)
    t, x = program.t, program.x
    assert sp.simplify(program.drift + (sp.Rational(3, 2) + 3 / (1 + t)) * x) == 0


def test_refused_names_cover_torch_module_attributes():
    """Every public attribute of torch.nn.Module (which the generated class inherits) is refused."""
    from sdelang.compiler.check import MODULE_ATTRIBUTES

    public = {n for n in dir(torch.nn.Module) if not n.startswith("_")}
    assert public <= MODULE_ATTRIBUTES, sorted(public - MODULE_ATTRIBUTES)


@pytest.mark.parametrize("comment", ['# say """hi"""', r"# C:\New", r"# \x41", r"# \u00e9", '# "quoted"'])
def test_comments_with_quotes_and_backslashes(comment):
    """The source is quoted in the module docstring; any comment text must come back unchanged."""
    text = f"sde commented\n{comment}\ndx = -x dt + 1 dw\n"
    compiled = sdelang.compile_source(sdelang.Source(text, "commented.sde"))
    module = import_code(compiled.code)
    assert comment in module.__doc__


def test_line_continuation_with_trailing_blanks_gives_clean_module():
    """A continuation followed by blanks compiles to a module that imports without any warning."""
    import warnings

    text = "sde continued\ndx = -x dt \\  \n     + 1 dw\n"
    compiled = sdelang.compile_source(sdelang.Source(text, "continued.sde"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_code(compiled.code)


@pytest.mark.parametrize("bare, explicit", [
    ("dx = -x / (1 + t) dt + dw", "dx = -x / (1 + t) dt + 1 dw"),
    ("dx = dw", "dx = 1 dw"),
    ("dx = v dt\ndv = -x - 2 * v dt + dw\nv(0) ~ normal(0, 0.01)",
     "dx = v dt\ndv = -x - 2 * v dt + 1 dw\nv(0) ~ normal(0, 0.01)"),
])
def test_a_bare_dw_is_unit_noise(bare, explicit):
    """`+ dw` and `dx = dw` (the textbook spelling of a unit diffusion) compile to the module of `+ 1 dw`: the
    same code apart from the quoted source (the lines with 'dw' and its hash). They were refused with "the SDE line must end with 'dw'"."""
    def code(line):
        compiled = sdelang.compile_source(sdelang.Source(f"sde unit\n{line}\nt in [1e-5, 2]\n", "unit.sde"))
        return [row for row in compiled.code.splitlines() if " dw" not in row and "sha256" not in row]

    assert code(bare) == code(explicit)
    brownian = sdelang.load("sde unit\ndx = dw\nt in [1e-5, 2]\n").double()
    t = torch.tensor([1e-5, 0.5, 2.0], dtype=torch.float64)
    assert torch.equal(brownian.std(t), t.sqrt())


def test_a_closed_form_that_cancels_near_eps_gives_way_to_quadrature():
    """g(0) = 0 with a growing drift: every closed form of v is like e^x - 1 - x (x = 2 a t), which
    cancels near t = eps (float64 loses ~5e-5 relative at t = 1e-5, float32 everything). The compiler
    measures that and integrates instead; float32 sigma is then within 1e-5 of float64, the issue's
    bound, and logSNR agrees with log(m^2 / v)."""
    text = "sde growth\nparam q = 0.5\ndx = 0.1 * (x - 0.1) dt + sqrt(q * t) dw\n"
    compiled = sdelang.compile_source(sdelang.Source(text, "growth.sde"))
    module = import_code(compiled.code)
    assert module.SDE.kernel_path.startswith("numeric")
    t = torch.tensor([1e-5, 1e-4, 1e-3, 1e-2, 0.5, 1.0], dtype=torch.float64)
    sde64, sde32 = module.SDE().double(), module.SDE().float()
    std = sde64.std(t)
    # Independent reference: v(t) = q int_0^t s e^{2a(t-s)} ds = q/(4a^2) (e^{2at} - 1 - 2at), a = 0.1,
    # by its Taylor series (no cancellation): q t^2/2 sum_k (2at)^k 2/(k+2)!.
    x = 0.2 * t
    series = sum(x**k * (2 / math.factorial(k + 2)) for k in range(20))
    np.testing.assert_allclose(std.numpy(), torch.sqrt(0.5 * t**2 / 2 * series).numpy(), rtol=1e-12)
    assert ((sde32.std(t.float()).double() / std - 1).abs() < 1e-5).all()
    expected = torch.log(sde64.mean_coeff(t) ** 2 / std**2)
    np.testing.assert_allclose(sde64.log_snr(t).numpy(), expected.numpy(), rtol=1e-12)
