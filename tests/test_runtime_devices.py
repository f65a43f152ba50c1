"""The runtime (models, losses, samplers, likelihood, training) in float32 and float64 and on CUDA.

CPU: a score model built on an SDE of either dtype computes in that dtype end to end: its outputs, the
losses and their gradients, every sampler and the flow-ODE likelihood come out in the dtype, finite.
CUDA (skipped without a GPU): a tiny training run on the device, every sampler on the device, the
likelihood on the device equal to the CPU's for the same weights, and fixed-step samplers whose steps
never wait for the GPU.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from sdelang.runtime.config import ModelConfig, TrainConfig
from sdelang.runtime.gaussian import GaussianData
from sdelang.runtime.likelihood import log_likelihood
from sdelang.runtime.losses import LOSSES
from sdelang.runtime.models import build_model
from sdelang.runtime.sampling import METHODS, sample
from sdelang.runtime.training import load_run, train

ROOT = Path(__file__).resolve().parents[1]
F32, F64 = torch.float32, torch.float64
DTYPES = pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
SDE_NAME = "vp_likelihood"  # importance-sampled t: sample_t goes through the inverse CDF
TINY = ModelConfig(width=16, depth=1, embedding=8)
BATCH, DIM, STEPS = 8, 2, 3
FIXED_STEP = tuple(m for m in METHODS if m != "ode")


def tiny_model(sde, seed: int = 0):
    """A random-weight MLP score model for 2-D data on `sde`, in sde's dtype (and on its device); the
    weights depend on the seed only, and the global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(sde, (DIM,), TINY).to(sde._anchor.device, sde._anchor.dtype).eval()


def sample_steps(method: str):
    """A few steps for the fixed-step methods; the adaptive 'ode' takes none."""
    return None if method == "ode" else STEPS


def assert_tensor(x: torch.Tensor, shape, dtype, device: str = "cpu") -> None:
    assert (tuple(x.shape), x.dtype, x.device.type) == (tuple(shape), dtype, device)
    assert bool(torch.isfinite(x).all())


# --- dtype, on the CPU ----------------------------------------------------------------------------

@DTYPES
def test_score_model_computes_in_the_sde_dtype(examples, dtype):
    sde = examples[SDE_NAME].build(dtype=dtype)
    model = tiny_model(sde)
    assert all(p.dtype == dtype for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, DIM, generator=generator, dtype=dtype)
    t = sde.sample_t(BATCH, generator=generator)
    assert_tensor(model(x, t), (BATCH, DIM), dtype)
    assert_tensor(model(x, t, noise=True), (BATCH, DIM), dtype)


@DTYPES
@pytest.mark.parametrize("objective", sorted(LOSSES))
def test_losses_and_gradients_in_the_sde_dtype(examples, dtype, objective):
    sde = examples[SDE_NAME].build(dtype=dtype)
    model = tiny_model(sde).train()
    generator = torch.Generator().manual_seed(0)
    x0 = GaussianData(sde, 0.5, 0.5, (DIM,)).sample(BATCH, generator=generator, dtype=dtype)
    loss = LOSSES[objective](sde, model, x0, generator=generator)
    assert_tensor(loss, (BATCH,), dtype)
    loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert_tensor(p.grad, p.shape, dtype)


@DTYPES
@pytest.mark.parametrize("method", METHODS)
def test_every_sampler_in_the_sde_dtype(examples, dtype, method):
    sde = examples[SDE_NAME].build(dtype=dtype)
    with torch.no_grad():
        out = sample(sde, tiny_model(sde), (BATCH, DIM), method, sample_steps(method),
                     generator=torch.Generator().manual_seed(0))
    assert_tensor(out.x, (BATCH, DIM), dtype)
    assert out.nfe >= 1


def test_float32_sampling_agrees_with_float64(examples):
    """DDIM (deterministic) from the same x_T with the same weights: float32 follows float64.

    Tolerance: 64 float32 roundings (eps = 1.2e-7) of the samples' largest magnitude, which a random
    network makes O(100) here; the observed gap is 2 to 3 roundings (five seeds), so the margin is over
    twentyfold, while a step taken in the wrong dtype or on a wrongly cast schedule is off by far more.
    """
    sde64 = examples[SDE_NAME].build(dtype=F64)
    model64 = tiny_model(sde64)
    model32 = copy.deepcopy(model64).float()
    x_T = sde64.prior_sampling((BATCH, DIM), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = sample(sde64, model64, (BATCH, DIM), "ddim", STEPS, x_T=x_T).x
        got = sample(model32.sde, model32, (BATCH, DIM), "ddim", STEPS, x_T=x_T.float()).x
    assert got.dtype == F32
    gap = (got.double() - want).abs().max()
    assert gap <= 64 * torch.finfo(F32).eps * want.abs().max()


@DTYPES
def test_log_likelihood_in_the_sde_dtype(examples, dtype):
    sde = examples[SDE_NAME].build(dtype=dtype)
    x = GaussianData(sde, 0.5, 0.5, (DIM,)).sample(BATCH, generator=torch.Generator().manual_seed(0), dtype=dtype)
    result = log_likelihood(sde, tiny_model(sde), x, exact_trace=True)
    assert_tensor(result.logp, (BATCH,), dtype)
    assert result.nfe >= 1


# --- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_tiny_training_run_on_cuda(tmp_path):
    """Training, its end-of-run sample plot and held-out NLL run on the device; the run reloads there."""
    source = (ROOT / "examples" / f"{SDE_NAME}.sde").read_text(encoding="utf-8")
    config = TrainConfig(sde_source=source, sde_name=f"{SDE_NAME}.sde", data="moons", steps=10, batch=64,
                         log_every=5, checkpoint_every=10, warmup=5, plot_samples=100, eval_every=10,
                         device="cuda", model=TINY)
    run = train(config, tmp_path, progress=False)
    assert run.step == 10 and len(run.losses) == 2
    assert all(math.isfinite(loss) for _, loss in run.losses)
    assert all(p.device.type == "cuda" for p in run.model.parameters())
    assert len((tmp_path / "eval.csv").read_text().splitlines()) == 2
    loaded = load_run(tmp_path, device="cuda")
    assert all(p.device.type == "cuda" for p in loaded.model.parameters())
    trained, reloaded = run.model.state_dict(), loaded.model.state_dict()
    assert trained.keys() == reloaded.keys()
    for name in trained:
        assert torch.equal(trained[name], reloaded[name]), name


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_every_sampler_on_cuda(examples, method):
    sde = examples[SDE_NAME].build(dtype=F32).to("cuda")
    with torch.no_grad():
        out = sample(sde, tiny_model(sde), (BATCH, DIM), method, sample_steps(method),
                     generator=torch.Generator("cuda").manual_seed(0))
    assert_tensor(out.x, (BATCH, DIM), F32, "cuda")


@pytest.mark.cuda
def test_log_likelihood_on_cuda_matches_the_cpu(examples):
    """Same weights, same inputs, float64, exact trace: log p agrees to 1e-6 relative.

    rtol = atol = 1e-8 make each solve accurate far below the 1e-6 compared, so the agreement does not
    depend on both devices' rounding leading the adaptive solver to the same steps.
    """
    sde = examples[SDE_NAME].build(dtype=F64)
    model = tiny_model(sde)
    x = GaussianData(sde, 0.5, 0.5, (DIM,)).sample(BATCH, generator=torch.Generator().manual_seed(0))
    want = log_likelihood(sde, model, x, exact_trace=True, rtol=1e-8, atol=1e-8).logp
    cuda_model = copy.deepcopy(model).to("cuda")
    got = log_likelihood(cuda_model.sde, cuda_model, x.to("cuda"), exact_trace=True, rtol=1e-8, atol=1e-8).logp
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("method", FIXED_STEP)
def test_fixed_step_samplers_never_wait_for_the_gpu(examples, method):
    """With sync debug mode 'error' any synchronising operation raises. It is switched on by the first
    score call, so it covers every step and the final Tweedie step; the set-up before the loop may copy
    a few scalars to the device once. A first run beforehand absorbs lazy CUDA initialisation."""
    sde = examples["vp"].build(dtype=F64).to("cuda")
    data = GaussianData(sde, 0.5, 0.5, (DIM,))
    data.mean = data.mean.to("cuda")  # GaussianData keeps mu on the CPU; copying it in every call would sync

    def score(x, t):
        torch.cuda.set_sync_debug_mode("error")
        return data.score(x, t)

    def run(score_fn):
        return sample(sde, score_fn, (BATCH, DIM), method, STEPS, generator=torch.Generator("cuda").manual_seed(0))

    run(data.score)
    torch.cuda.synchronize()
    try:
        out = run(score)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_tensor(out.x, (BATCH, DIM), F64, "cuda")
