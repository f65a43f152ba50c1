"""Generated modules follow `.to(device, dtype)`, compile without graph breaks, and keep no state.

Every method's output takes the module's dtype and device (sample_t and prior_sampling included);
moving a module and moving it back changes nothing; torch.compile(fullgraph=True) traces the whole
training and sampling surface; the state dict is empty, so adding an SDE to a model never breaks
its checkpoints. The CUDA tests (skipped without a GPU) compare every method with the CPU and check
that none of them waits for the device.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (ROOT / "examples").glob("*.sde"))
F32, F64 = torch.float32, torch.float64
BATCH = 5
QUADRATURE = "numeric"  # the one example on the numeric path: Gauss-Legendre buffers, bisection


def inputs(sde, dtype=F64, device="cpu"):
    """x of shape [B, 2, 3], t in [eps, T] (both ends, log- and linearly spaced inside) and u in [0, 1]."""
    eps, T = float(sde.eps), float(sde.T)
    t = torch.tensor([eps, eps * (T / eps) ** 0.25, eps * (T / eps) ** 0.75, (eps + T) / 2, T], dtype=F64)
    x = 2 * torch.randn(BATCH, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    u = torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], dtype=F64)
    return tuple(v.to(device, dtype) for v in (x, t, u))


def score(x, t):
    """A stand-in score function: the score of N(0, I)."""
    return -x


def deterministic(sde, x, t, u) -> dict[str, torch.Tensor]:
    """Every method whose output is a function of its inputs, by name (those of the module's kind)."""
    out = {}
    kind = sde.kind
    out["sde.drift"], out["sde.diffusion"] = sde.sde(x, t)
    names = ["weight", "t_density", "t_cdf"]
    if kind == "affine":
        out["marginal_prob.mean"], out["marginal_prob.std"] = sde.marginal_prob(x, t)
        names += ["diffusion", "mean_coeff", "mean_offset", "std", "log_snr"]
    if kind == "coupled":
        data = sde.data(x)
        out["marginal_prob.mean"], out["marginal_prob.cov"] = sde.marginal_prob(data, t)
        out["perturb"] = sde.perturb(data, t, x)
        out["noise_to_score"] = sde.noise_to_score(x, t)
        out["init_logp"] = sde.init_logp(x)
        names += ["diffusion", "profile", "time_change"]
    else:
        out["discretize.f"], out["discretize.G"] = sde.discretize(x, t)
    if kind == "general":
        out["noise_gradient"] = sde.noise_gradient(x, t)
    for name in names:
        out[name] = getattr(sde, name)(t)
    out["t_icdf"] = sde.t_icdf(u)
    out["prior_logp"] = sde.prior_logp(x)
    out["drift_divergence"] = sde.drift_divergence(x, t)
    for flow in (False, True):
        reverse = sde.reverse(score, probability_flow=flow)
        out[f"reverse(flow={flow}).sde.drift"], out[f"reverse(flow={flow}).sde.diffusion"] = reverse.sde(x, t)
        if kind != "coupled":
            out[f"reverse(flow={flow}).discretize.f"], out[f"reverse(flow={flow}).discretize.G"] = reverse.discretize(x, t)
    return out


def random(sde, seed: int | None = 0) -> dict[str, torch.Tensor]:
    """The two sampling methods, each from its own generator seeded with ``seed`` (None: the global one)."""
    device = sde._anchor.device

    def generator():
        return None if seed is None else torch.Generator(device).manual_seed(seed)

    return {"sample_t": sde.sample_t(BATCH, generator=generator()),
            "prior_sampling": sde.prior_sampling((BATCH, 2, 3), generator=generator())}


def everything(sde, dtype=F64, device="cpu", seed: int | None = 0):
    return {**deterministic(sde, *inputs(sde, dtype, device)), **random(sde, seed)}


def assert_identical(got: dict, want: dict):
    """Same names, and bitwise the same tensors (same dtype, device and values; NaN nowhere)."""
    assert got.keys() == want.keys()
    different = [k for k in want if not (got[k].dtype == want[k].dtype and got[k].device == want[k].device
                                         and torch.equal(got[k], want[k]))]
    assert not different, f"outputs that changed: {different}"


# --- dtype ----------------------------------------------------------------------------------------

CONVERSIONS = {
    "double()": (lambda m: m.double(), F64),
    "float() after double()": (lambda m: m.double().float(), F32),
    "to(float64)": (lambda m: m.to(F64), F64),
    "to(float32) after to(float64)": (lambda m: m.to(F64).to(F32), F32),
}


@pytest.mark.parametrize("conversion", CONVERSIONS)
@pytest.mark.parametrize("name", NAMES)
def test_to_dtype_converts_every_output(all_examples, name, conversion):
    """After a dtype conversion every method returns finite tensors of that dtype, given t of that dtype."""
    convert, dtype = CONVERSIONS[conversion]
    sde = convert(all_examples[name].module.SDE())
    for key, value in everything(sde, dtype).items():
        assert torch.is_tensor(value), f"{key} returned a {type(value).__name__}"
        assert value.dtype == dtype, f"{key} is {value.dtype}, not {dtype}"
        assert value.device.type == "cpu", key
        assert torch.isfinite(value).all(), f"{key} is not finite: {value}"


@pytest.mark.parametrize("name", NAMES)
def test_dtype_round_trip_is_lossless(all_examples, name):
    """.float().double() leaves a module computing bitwise what a module that stayed in float64 computes.

    The module holds no learned state, only constants of the SDE, so a round trip has nothing to lose;
    both modules then run the same operations on the same inputs, hence exact equality.
    """
    cls = all_examples[name].module.SDE
    assert_identical(everything(cls().float().double()), everything(cls().double()))


# --- meta device ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_meta_device_gives_the_shapes_and_dtypes(all_examples, name):
    """On the meta device every method runs and returns what it returns on the CPU, minus the values."""
    cls = all_examples[name].module.SDE
    meta = cls().to("meta", F64)
    assert meta._anchor.device.type == "meta"
    got, want = everything(meta, F64, "meta", seed=None), everything(cls().double())
    assert got.keys() == want.keys()
    for key in want:
        assert (got[key].device.type, got[key].shape, got[key].dtype) == ("meta", want[key].shape, want[key].dtype), key


@pytest.mark.parametrize("name", NAMES)
def test_built_on_meta_then_materialised(all_examples, name):
    """Built under torch.device('meta') and materialised with to_empty(), as large models are, it is exact.

    This is how big models are initialised (FSDP, torchtitan): build on meta, to_empty() onto the real
    device, then load a checkpoint. The SDE's state dict is empty, so nothing is loaded into it.
    """
    cls = all_examples[name].module.SDE
    with torch.device("meta"):
        sde = cls()
    sde = sde.to_empty(device="cpu").double()
    assert_identical(everything(sde), everything(cls().double()))


# --- torch.compile ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vp", "cosine_vp", QUADRATURE])
def test_torch_compile_fullgraph_matches_eager(all_examples, name):
    """One function calling the training and sampling methods compiles as a single graph and agrees.

    fullgraph=True turns any graph break into an error, so this passes only if the closed forms, the
    Gauss-Legendre quadrature and the fixed-length bisection all trace. With the eager backend the
    graph runs the very same torch operations in the same order, so the results are bitwise equal.
    """
    sde = all_examples[name].module.SDE().double()
    reverse = sde.reverse(score)

    def fn(x, t, u):
        return (*sde.sde(x, t), *sde.marginal_prob(x, t), *sde.discretize(x, t), sde.std(t), sde.log_snr(t),
                sde.weight(t), sde.t_density(t), sde.t_icdf(u), sde.drift_divergence(x, t), *reverse.sde(x, t))

    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        x, t, u = inputs(sde)
        got, want = compiled(x, t, u), fn(x, t, u)
    finally:
        torch._dynamo.reset()
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"output {i} differs: {g} != {w}"


# --- state ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_no_state_in_checkpoints(all_examples, name):
    """No parameters and an empty state dict: a model that gains an SDE still loads its old checkpoints.

    Also the other way round: a checkpoint of a model holding an SDE has only the network's entries
    and loads strictly into a model whose SDE was built with other parameters.
    """
    cls = all_examples[name].module.SDE
    sde = cls()
    assert list(sde.parameters()) == []
    assert sde.state_dict() == {}

    class Model(torch.nn.Module):
        def __init__(self, with_sde: bool):
            super().__init__()
            self.net = torch.nn.Linear(3, 3)
            if with_sde:
                self.sde = cls(N=10)

    old = Model(with_sde=False).state_dict()
    new = Model(with_sde=True)
    new.load_state_dict(old, strict=True)
    assert torch.equal(new.net.weight, old["net.weight"])
    saved = new.state_dict()
    assert sorted(saved) == ["net.bias", "net.weight"]
    Model(with_sde=True).load_state_dict(saved, strict=True)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_computes_the_same(all_examples, name):
    """copy.deepcopy (as EMA and checkpointing code does) gives a module with identical outputs."""
    sde = all_examples[name].module.SDE().double()
    assert_identical(everything(copy.deepcopy(sde)), everything(sde))


# --- CUDA -----------------------------------------------------------------------------------------

def cuda_tolerance(dtype) -> float:
    """Relative and absolute tolerance for CUDA against the CPU: 4096 units of roundoff.

    CUDA's and the CPU's exp, log, expm1, sin, cos and pow each differ from the correctly rounded value
    by a few ulp, and the GPU fuses multiply-adds; the methods chain a few dozen such operations, some
    ill-conditioned (cos near pi/2 at T in cosine_vp, exp(B(s)) up to e^13 in the quadrature, the
    bisection's inverse). A pessimistic proxy, float32 against float64 on the CPU (which adds the
    rounding of the inputs), differs by at most ~800 ulp (edm_ve's reverse step); 4096 leaves a
    fivefold margin, while a wrong formula, dtype or device path is off by far more. The absolute part
    is for values that cross zero (logSNR, c(t), t_cdf at eps), whose scale is O(1).
    """
    return 4096 * torch.finfo(dtype).eps


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(all_examples, name, dtype):
    """Every deterministic method on CUDA returns a CUDA tensor of the dtype equal to the CPU's result."""
    cls = all_examples[name].module.SDE
    cpu, cuda = cls().to(dtype), cls().to("cuda", dtype)
    want = deterministic(cpu, *inputs(cpu, dtype))
    got = deterministic(cuda, *inputs(cuda, dtype, "cuda"))
    tol = cuda_tolerance(dtype)
    for key in want:
        assert (got[key].device.type, got[key].dtype) == ("cuda", dtype), key
        torch.testing.assert_close(got[key].cpu(), want[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_sampling(all_examples, name, dtype):
    """sample_t and prior_sampling draw on the device: sample_t is t_icdf of the device's uniforms."""
    cuda = all_examples[name].module.SDE().to("cuda", dtype)
    draws = random(cuda, seed=7)
    for key, value in draws.items():
        assert (value.device.type, value.dtype) == ("cuda", dtype), key
        assert torch.isfinite(value).all(), key
    t = draws["sample_t"]
    assert t.shape == (BATCH,) and bool(((t >= cuda.eps) & (t <= cuda.T)).all())
    u = torch.rand(BATCH, generator=torch.Generator("cuda").manual_seed(7), device="cuda", dtype=dtype)
    assert torch.equal(t, cuda.t_icdf(u))
    assert draws["prior_sampling"].shape == (BATCH, 2, 3)
    assert_identical(random(cuda, seed=7), draws)


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_round_trip_is_lossless(all_examples, name):
    """.cuda().cpu() leaves a float64 module computing bitwise what a module that never moved computes."""
    cls = all_examples[name].module.SDE
    moved = cls().double().to("cuda").to("cpu")
    assert moved._anchor.device.type == "cpu"
    assert_identical(everything(moved), everything(cls().double()))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_no_host_device_sync(all_examples, name, dtype):
    """No method waits for the GPU: with sync debug mode 'error' a synchronising operation raises.

    Covers sde, marginal_prob, discretize, sample_t, t_icdf and prior_sampling, and with them every
    other method. Each is called once beforehand, as lazy CUDA initialisation may synchronise once.
    """
    cuda = all_examples[name].module.SDE().to("cuda", dtype)
    x, t, u = inputs(cuda, dtype, "cuda")
    calls = {
        "sde": lambda: cuda.sde(x, t),
        "marginal_prob": lambda: cuda.marginal_prob(x, t),
        "discretize": lambda: cuda.discretize(x, t),
        "sample_t": lambda: cuda.sample_t(BATCH),
        "t_icdf": lambda: cuda.t_icdf(u),
        "prior_sampling": lambda: cuda.prior_sampling((BATCH, 2, 3)),
        "the other methods": lambda: deterministic(cuda, x, t, u),
    }
    for call in calls.values():
        call()
    torch.cuda.synchronize()
    failures = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for what, call in calls.items():
            try:
                call()
            except RuntimeError as exc:
                failures[what] = str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not failures, f"synchronising calls: {failures}"
