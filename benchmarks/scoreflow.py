"""ScoreFlow's ordering, measured: weighting, time sampling and dequantisation against held-out bits/dim.

For one image data set (digits or patches) and one network and training budget, five runs:

    VP, sigma^2 weighting, uniform t            (score_sde's default; examples/vp.sde)
    VP, likelihood weighting, uniform t
    VP, likelihood weighting, importance t      (examples/vp_likelihood.sde)
    VP, likelihood weighting, importance t, + a variational dequantiser fitted to that model
    subVP, likelihood weighting, importance t   (+ its variational dequantiser)

The SDE texts are examples/vp.sde and examples/subvp.sde with their `t in`, `weighting` and `t ~` lines
replaced, t in [1e-5, 1] for all. Each model is evaluated on the same held-out images: bits/dim of the
probability-flow ODE (Hutchinson, one Rademacher probe, adaptive dopri5 at --tol) and of ScoreFlow's
bound (--bound-samples draws per image), each as mean and standard error over the images (the SE includes
the spread of the images, of the dequantisation noise, of the probe and of the bound's Monte Carlo).
Rows with a variational dequantiser use u ~ q(u | k) and count log q (dequantize.py); the others
uniform noise. Writes one JSON file per data set and prints a markdown table (docs/scoreflow.md).

    python benchmarks/scoreflow.py --data digits [--steps 400 --batch 64 --width 16 --depth 2 ...]
    python benchmarks/scoreflow.py --refit RUN_DIR --dequantize-steps 600 [--n 200 ...]

--refit takes one trained run directory (one of the above, or any `sdelang train` image run), fits a
fresh variational dequantiser to its model for --dequantize-steps steps and evaluates uniform against
variational dequantisation on the same images, with paired differences: how much q buys with a longer fit.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch

from sdelang.files import write_atomic
from sdelang.runtime import dequantize
from sdelang.runtime.config import ModelConfig, TrainConfig
from sdelang.runtime.data import load_data
from sdelang.runtime.likelihood import bits_per_dim, bound, log_likelihood
from sdelang.runtime.training import train

ROOT = Path(__file__).resolve().parents[1]
RUNS = [  # (label, example, weighting, t sampling, fit a variational dequantiser)
    ("VP, sigma^2, uniform t", "vp", "score_matching", "uniform", False),
    ("VP, likelihood, uniform t", "vp", "likelihood", "uniform", False),
    ("VP, likelihood, importance t", "vp", "likelihood", "importance", True),
    ("subVP, likelihood, importance t", "subvp", "likelihood", "importance", True),
]


def sde_text(example: str, weighting: str, sampler: str) -> str:
    text = (ROOT / "examples" / f"{example}.sde").read_text(encoding="utf-8")
    text = re.sub(r"^(t in|weighting|t ~).*\n", "", text, flags=re.M)
    return text + f"t in [1e-5, 1]\nweighting {weighting}\nt ~ {sampler}\n"


def evaluate(model, test, n: int, *, tol: float, bound_samples: int, dequantizer=None, seed: int = 0) -> dict:
    """Held-out bits/dim (flow ODE and bound), mean and standard error over n images evenly spaced through
    the test split (patches: both photographs), batch by batch."""
    sde = model.sde
    generator = torch.Generator().manual_seed(seed)
    k = test.x[torch.linspace(0, len(test) - 1, n).round().long()]      # spread over the whole test split
    if dequantizer is None:
        x, log_q = test.dequantise(k, generator), torch.zeros(len(k), dtype=torch.float64)
    else:
        with torch.no_grad():
            u, log_q = dequantizer.sample(k, generator)
        x, log_q = test.to_model(k, u), log_q.double()
    dims = x[0].numel()
    flows, bounds, nfes = [], [], []
    started = time.perf_counter()
    for chunk in x.split(64):
        result = log_likelihood(sde, model, chunk, rtol=tol, atol=tol, generator=generator)
        flows.append(result.logp.double())
        nfes.append(result.nfe)
    flow_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        for chunk in x.split(64):
            bounds.append(bound(sde, model, chunk, samples=bound_samples, samples_per_call=max(1, 2**15 // chunk.numel()),
                                generator=generator).value.double())
    bound_seconds = time.perf_counter() - started
    flow_bpd = bits_per_dim(torch.cat(flows) - log_q, dims, scale=test.scale, levels=test.levels)
    bound_bpd = bits_per_dim(-(torch.cat(bounds) + log_q), dims, scale=test.scale, levels=test.levels)
    se = lambda v: float(v.std() / math.sqrt(len(v)))
    return dict(flow_bpd=float(flow_bpd.mean()), flow_se=se(flow_bpd), bound_bpd=float(bound_bpd.mean()),
                bound_se=se(bound_bpd), nfe=sum(nfes) / len(nfes), n=len(k), flow_seconds=flow_seconds,
                bound_seconds=bound_seconds, mean_log_q=float(log_q.mean()),
                flow_per_image=flow_bpd.tolist(), bound_per_image=bound_bpd.tolist())


def paired(rows: list[dict], key: str) -> list[str]:
    """Each row's mean difference to the first row on the same images, with its paired standard error: the
    images' own spread (flat sky against foliage) cancels, which the unpaired errors above do not."""
    base = torch.tensor(rows[0][key])
    out = []
    for r in rows[1:]:
        d = torch.tensor(r[key]) - base
        out.append(f"{d.mean():+.3f} ± {d.std() / math.sqrt(len(d)):.3f}")
    return out


def refit(args) -> None:
    from sdelang.runtime.training import load_run

    run = load_run(args.refit)
    train_set, test = load_data(run.config.data, split="train"), load_data(run.config.data, split="test")
    n = min(args.n, len(test))
    rows = [dict(label="uniform", **evaluate(run.model, test, n, tol=args.tol, bound_samples=args.bound_samples,
                                             seed=args.seed))]
    print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("per_image")}), flush=True)
    deq = dequantize.Dequantizer(dequantize.DequantizerConfig(tuple(train_set.shape)))
    started = time.perf_counter()
    history = dequantize.fit(run.model, deq, train_set, steps=args.dequantize_steps, batch=args.dequantize_batch,
                             seed=args.seed)
    seconds = time.perf_counter() - started
    deq.eval().requires_grad_(False)
    rows.append(dict(label=f"variational ({args.dequantize_steps} steps)", train_seconds=seconds, objective=history,
                     **evaluate(run.model, test, n, tol=args.tol, bound_samples=args.bound_samples, dequantizer=deq,
                                seed=args.seed)))
    print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("per_image")}), flush=True)
    write_atomic(Path(args.refit) / f"refit_{args.dequantize_steps}.json",
                 json.dumps(dict(args=vars(args), rows=rows), indent=1) + "\n")
    flow, upper = paired(rows, "flow_per_image"), paired(rows, "bound_per_image")
    print(f"\n{args.refit}: {n} held-out images; variational minus uniform, paired over the images: "
          f"flow ODE {flow[0]} bits/dim, bound {upper[0]} bits/dim; E log q = {rows[1]['mean_log_q']:.2f} nats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--n", type=int, default=200, help="held-out images")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--bound-samples", type=int, default=32)
    parser.add_argument("--dequantize-steps", type=int, default=200)
    parser.add_argument("--dequantize-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/scoreflow")
    parser.add_argument("--runs", default=None, help="comma-separated row numbers of RUNS to train (default all)")
    parser.add_argument("--refit", metavar="RUN_DIR", help="fit and evaluate a dequantiser for one trained run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.refit:
        refit(args)
        return
    out = Path(args.out) / args.data
    train_set, test = load_data(args.data, split="train"), load_data(args.data, split="test")
    n = min(args.n, len(test))
    rows = []
    chosen = RUNS if args.runs is None else [RUNS[int(i)] for i in args.runs.split(",")]
    for label, example, weighting, sampler, variational in chosen:
        config = TrainConfig(sde_source=sde_text(example, weighting, sampler), sde_name=f"{example}.sde",
                             data=args.data, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                             plot_samples=0, checkpoint_every=args.steps,
                             model=ModelConfig(kind="unet", width=args.width, depth=args.depth))
        started = time.perf_counter()
        run = train(config, out / f"{example}_{weighting}_{sampler}_s{args.seed}", progress=False)
        seconds = time.perf_counter() - started
        model = run.model
        row = dict(label=label, dequantisation="uniform", train_seconds=seconds, final_loss=run.losses[-1][1],
                   **evaluate(model, test, n, tol=args.tol, bound_samples=args.bound_samples, seed=args.seed))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if variational:
            deq = dequantize.Dequantizer(dequantize.DequantizerConfig(tuple(train_set.shape)))
            started = time.perf_counter()
            history = dequantize.fit(model, deq, train_set, steps=args.dequantize_steps,
                                     batch=args.dequantize_batch, seed=args.seed)
            seconds = time.perf_counter() - started
            deq.eval().requires_grad_(False)
            dequantize.save(deq, out / f"{example}_{weighting}_{sampler}_s{args.seed}", args.dequantize_steps)
            row = dict(label=label + " + variational dequantisation", dequantisation="variational",
                       train_seconds=seconds, objective=history,
                       **evaluate(model, test, n, tol=args.tol, bound_samples=args.bound_samples,
                                  dequantizer=deq, seed=args.seed))
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = "results.json" if args.runs is None else f"results_{args.runs.replace(',', '_')}.json"
    write_atomic(out / name, json.dumps(dict(args=vars(args), rows=rows), indent=1) + "\n")
    print(f"\n{args.data}: {args.steps} steps, batch {args.batch}, U-Net width {args.width} depth {args.depth}, "
          f"{n} held-out images, seed {args.seed}\n")
    flow_diff, bound_diff = ["-"] + paired(rows, "flow_per_image"), ["-"] + paired(rows, "bound_per_image")
    print("| run | flow ODE bits/dim | vs first (paired) | bound bits/dim | vs first (paired) | NFE | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r, fd, bd in zip(rows, flow_diff, bound_diff):
        print(f"| {r['label']} | {r['flow_bpd']:.3f} ± {r['flow_se']:.3f} | {fd} | {r['bound_bpd']:.3f} ± "
              f"{r['bound_se']:.3f} | {bd} | {r['nfe']:.0f} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
