"""Negative log-likelihood of held-out data, in nats and bits/dim, with a standard error.

Images (8-bit) are dequantised once with uniform noise, y = (k + u) / 256, and seen by the model as
x = 2 y - 1; bits/dim counts the density of y (MATH.md section 5). Continuous points report the
density of x itself, bpd = nll / (D ln 2). The standard error is that of the mean over datapoints,
which includes the spread of the data, of the dequantisation and of the Hutchinson probes.
For a coupled SDE (CLD) the NLL is -[log p(x, v0) - log q(v0)] with v0 drawn from its initial law q:
an upper bound on -log p(x) (see likelihood.log_likelihood), and bits/dim count the D entries of the
data x, not the K D of the state.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import DEFAULT_LIKELIHOOD_SOLVER, DEFAULT_NORM
from .likelihood import bits_per_dim, bound, log_likelihood, require_bound


class NLL(NamedTuple):
    nll_nats: float      # mean -log p per datapoint
    bpd: float           # mean bits per dimension
    stderr: float        # standard error of bpd over the datapoints
    nfe: float           # flow-drift evaluations per ODE solve (mean over batches)
    n: int
    bound_nats: float | None = None     # ScoreFlow Theorem 3 bound, when asked for
    bound_bpd: float | None = None
    bound_stderr: float | None = None   # standard error of bound_bpd over the datapoints

    def as_dict(self) -> dict:
        return {k: v for k, v in self._asdict().items() if v is not None}


# Samples farther than this many data standard deviations times sqrt(d) from the origin count as outliers.
# Data in model space have std 1 per entry (the runtime standardises points); the held-out sets of the
# bundled data reach at most 1.7 (moons, swissroll, checkerboard) and 2.75 (gaussian, 20,000 draws),
# and a Gaussian in d = 2 passes 3 with probability exp(-9) = 1.2e-4 (less in higher d).
OUTLIER_RADIUS = 3.0


def outliers(x: torch.Tensor, data_std: float) -> tuple[int, float]:
    """(count, r): the samples of x [n, ...] whose norm exceeds r = OUTLIER_RADIUS data_std sqrt(d), d the
    entries per sample. NaN or inf samples count as outliers."""
    d = x[0].numel()
    radius = OUTLIER_RADIUS * data_std * math.sqrt(d)
    norms = x.flatten(1).norm(dim=1)
    return int((~(norms <= radius)).sum()), radius


def held_out(dataset, n: int, generator: torch.Generator) -> torch.Tensor:
    """The first n held-out datapoints in model space (images dequantised with the generator's noise)."""
    k = dataset.x[:n]
    return k if dataset.levels is None else dataset.dequantise(k, generator)


def _variational(dataset, n: int, generator: torch.Generator, dequantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n held-out images dequantised by u ~ q(u | k), in model space, and log q(u | k) [n]."""
    if dataset.levels is None:
        raise ValueError(f"{dataset.name!r} holds continuous points; a dequantiser applies to 8-bit images only")
    k = dataset.x[:n]
    with torch.no_grad():
        u, log_q = dequantizer.to("cpu", k.dtype).sample(k, generator)
    return dataset.to_model(k, u), log_q.double()


def nll(model, dataset, *, n: int = 512, batch: int = 256, seed: int = 0, probes: int = 1,
        exact_trace: bool = False, rtol: float = 1e-5, atol: float = 1e-5, norm: str = DEFAULT_NORM,
        method: str = DEFAULT_LIKELIHOOD_SOLVER, with_bound: bool = False, progress: bool = False,
        dequantizer=None) -> NLL:
    """NLL of the first n datapoints of `dataset` (a test split) under the score model's flow ODE; D, the
    dimensions in bits/dim, is the number of entries of one datapoint of the data (for any kind of SDE).
    `progress` shows a bar over the batches (each an adaptive ODE solve, plus the bound's samples); rtol, atol,
    the step-error `norm` and the solver `method` go to log_likelihood.

    dequantizer: a variational dequantiser q(u | k) (dequantize.py) instead of uniform noise; every
    datapoint's log-likelihood (and bound) then counts -log q(u | k) too: bpd = -E[log p(y) - log q] /
    (D ln 2) + log2(L), the uniform case being log q = 0."""
    if n < 2 or batch < 1:
        raise ValueError(f"n must be >= 2 and batch >= 1, got n={n}, batch={batch}")
    sde = model.sde
    if with_bound:
        require_bound(sde)
    anchor = sde._anchor
    generator = torch.Generator("cpu").manual_seed(seed)
    if dequantizer is None:
        x = held_out(dataset, n, generator)
        log_q = torch.zeros(x.shape[0], dtype=torch.float64)
    else:
        x, log_q = _variational(dataset, n, generator, dequantizer)
    n = x.shape[0]
    dims = x[0].numel()
    logps, bounds, nfes = [], [], []
    device_generator = torch.Generator(anchor.device).manual_seed(seed)
    chunks = x.split(batch)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="nll" + (" and bound" if with_bound else ""), unit="batch", dynamic_ncols=True,
                      leave=False)
    for chunk in chunks:
        chunk = chunk.to(anchor.device, anchor.dtype)
        result = log_likelihood(sde, model, chunk, exact_trace=exact_trace, probes=1 if exact_trace else probes,
                                rtol=rtol, atol=atol, norm=norm, method=method, generator=device_generator)
        logps.append(result.logp.double().cpu())
        nfes.append(result.nfe)
        if progress:
            chunks.set_postfix(nfe=f"{result.nfe:.0f}")
        if with_bound:
            with torch.no_grad():
                # the score sees samples_per_call copies of the chunk at once: about 2^16 entries
                per_call = max(1, 2**16 // chunk.numel())
                bounds.append(bound(sde, model, chunk, samples_per_call=per_call,
                                    generator=device_generator).value.double().cpu())
    logp = torch.cat(logps) - log_q
    scale = dataset.scale
    bpd = bits_per_dim(logp, dims, scale=scale, levels=dataset.levels)
    extra = {}
    if with_bound:
        upper = torch.cat(bounds) + log_q
        upper_bpd = bits_per_dim(-upper, dims, scale=scale, levels=dataset.levels)
        extra = dict(bound_nats=float(upper.mean()), bound_bpd=float(upper_bpd.mean()),
                     bound_stderr=float(upper_bpd.std() / math.sqrt(n)))
    return NLL(nll_nats=float(-logp.mean()), bpd=float(bpd.mean()), stderr=float(bpd.std() / math.sqrt(n)),
               nfe=sum(nfes) / len(nfes), n=n, **extra)


def two_sample_test(a: torch.Tensor, b: torch.Tensor, *, permutations: int = 200,
                    generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel two-sample test: the unbiased MMD^2 between samples a [n, d] and b [m, d] with a Gaussian
    kernel (bandwidth: the median pairwise distance), and its permutation p-value (Gretton et al. 2012).

    Under the null hypothesis that a and b come from one distribution the p-value is uniform on
    (0, 1]; it is (1 + #{permuted MMD^2 >= observed}) / (1 + permutations), never exactly 0.
    """
    a, b = a.flatten(1).double(), b.flatten(1).double()
    n, m = a.shape[0], b.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"the two-sample test needs at least 2 points on each side, got {n} and {m}")
    pooled = torch.cat([a, b])
    distances = torch.cdist(pooled, pooled) ** 2
    bandwidth = distances[distances > 0].median()
    kernel = torch.exp(-distances / bandwidth)
    kernel.fill_diagonal_(0.0)
    labels = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(m, dtype=torch.bool)])
    orders = [torch.arange(n + m)] + [torch.randperm(n + m, generator=generator) for _ in range(permutations)]
    side = torch.stack([labels[order] for order in orders]).double()       # [P + 1, n + m], 1 = "a"
    to_a, to_b = side @ kernel, (1 - side) @ kernel                        # row sums towards each side
    mmd = ((to_a * side).sum(1) / (n * (n - 1)) + (to_b * (1 - side)).sum(1) / (m * (m - 1))
           - 2 * (to_a * (1 - side)).sum(1) / (n * m))
    observed = mmd[0]
    p_value = (1 + (mmd[1:] >= observed).sum()) / (1 + permutations)
    return float(observed), float(p_value)
