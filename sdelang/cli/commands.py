"""The runtime commands: ``sdelang train``, ``sdelang sample`` and ``sdelang nll``."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

from ..compiler import read_source
from ..runtime.config import OBJECTIVES, REDUCTIONS, ModelConfig, TrainConfig

# Sampler names the CLI accepts besides sampling.METHODS.
ALIASES = {"dpm": "dpm2", "dpm1": "ddim", "reverse": "reverse_diffusion"}


def table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, a rule under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _add_threads(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is often faster for small "
                             "models on a busy machine)")


def _set_threads(args) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)


def add_train(sub, params) -> None:
    defaults, model = TrainConfig(sde_source=""), ModelConfig()
    p = sub.add_parser("train", help="train a score model for an SDE on a dataset",
                       description="Train a score model with the file's weighting and time sampler. "
                                   "Rerunning with the same --out resumes from its checkpoint.")
    p.add_argument("file", metavar="SDE_FILE")
    p.add_argument("--data", default=defaults.data,
                   help="moons, swissroll, checkerboard, 8gaussians, gaussian, digits, a .npy file or an image folder")
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (created; resumed if it exists)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override an SDE parameter")
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--ema", type=float, default=defaults.ema)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective)
    p.add_argument("--reduction", choices=REDUCTIONS, default=defaults.reduction,
                   help="sum (the weighted score-matching integral, in nats for the likelihood weighting) "
                        "or mean over the entries of a sample")
    p.add_argument("--dtype", choices=("float32", "float64"), default=defaults.dtype)
    p.add_argument("--model", choices=("auto", "mlp", "unet"), default=model.kind)
    p.add_argument("--width", type=int, default=model.width)
    p.add_argument("--depth", type=int, default=model.depth)
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    _add_threads(p)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--sample-every", type=int, default=defaults.sample_every, help="sample plot every k steps")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every, help="held-out NLL every k steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=lambda args: _train(args, params))


def _train(args, params) -> int:
    from ..runtime.training import train

    _set_threads(args)
    source = read_source(args.file)
    config = TrainConfig(
        sde_source=source.text, sde_name=Path(args.file).name, params=params(args.param), data=args.data,
        steps=args.steps, batch=args.batch, lr=args.lr, ema=args.ema, seed=args.seed, objective=args.objective,
        reduction=args.reduction, dtype=args.dtype, device=args.device, checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every, eval_every=args.eval_every,
        model=ModelConfig(kind=args.model, width=args.width, depth=args.depth))
    started = time.perf_counter()
    with _distributed(config) as config:
        run = train(config, args.out, progress=not args.quiet)
    seconds = time.perf_counter() - started
    if int(os.environ.get("RANK", "0")) != 0:     # under torchrun, process 0 reports
        return 0
    last = run.losses[-1][1] if run.losses else math.nan
    print(table([("run", "sde", "data", "steps", "final loss", "seconds", "parameters"),
                 (str(args.out), config.sde_name, config.data, str(run.step), f"{last:.4g}", f"{seconds:.1f}",
                  str(sum(p.numel() for p in run.model.parameters())))]))
    return 0


@contextlib.contextmanager
def _distributed(config):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU), give each
    process its own GPU (LOCAL_RANK), and leave the group afterwards. Otherwise a no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield config
        return
    import torch
    import torch.distributed as dist

    cuda = config.device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        config = replace(config, device=f"cuda:{local}")
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield config
    finally:
        dist.destroy_process_group()


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample from a trained run",
                       description="Draw samples with one or more methods (comma-separated) and report NFE, "
                                   "time and, for 2-D data, a two-sample test against held-out data.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--method", default="pc", help="comma-separated sampler names: pc, em, reverse_diffusion, "
                                                  "ancestral, ald, ode, heun, ddim, dpm2 (dpm = dpm2), splitting "
                                                  "(coupled SDEs); a coupled or general SDE takes em, pc, ode, heun")
    p.add_argument("--steps", type=int, default=None, help="time steps (default: the SDE's N)")
    p.add_argument("-n", type=int, default=1000, help="number of samples")
    p.add_argument("--spacing", choices=("time", "logsnr"), default=None,
                   help="time grid of the fixed-step methods (default: each method's own; logsnr suits "
                        "SDEs whose noise level spans decades, such as EDM-style VE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PNG", help="write a scatter plot or image grid (one per method)")
    p.add_argument("--save", metavar="NPY", help="write the samples of the first method as a .npy file")
    p.add_argument("--device", default=None)
    _add_threads(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=_sample)


def _methods(text: str) -> list[str]:
    from ..runtime.sampling import ALL_METHODS

    methods = [ALIASES.get(m.strip(), m.strip()) for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown sampling method {', '.join(unknown) or text!r}; choose from "
                         f"{', '.join(ALL_METHODS)} (aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return methods


def _applicable(methods: list[str], sde) -> None:
    """Refuse, before any work, the methods this run's SDE cannot use, naming those it can."""
    from ..runtime.kinds import kind_of
    from ..runtime.sampling import methods_for

    allowed = methods_for(sde)
    wrong = [m for m in methods if m not in allowed]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} cannot sample this {kind_of(sde)} SDE; methods that can: "
                         f"{', '.join(allowed)}")


def _spacing(method: str, spacing: str | None) -> dict:
    if spacing is None:
        return {}
    if method == "ode":
        raise ValueError("--spacing does not apply to 'ode' (the adaptive solver chooses its steps); "
                         "leave it out or choose another method")
    return {"spacing": spacing}


def _sample(args) -> int:
    import numpy as np
    import torch

    from ..runtime import plots
    from ..runtime.evaluate import held_out, two_sample_test
    from ..runtime.sampling import sample
    from ..runtime.training import load_run

    _set_threads(args)
    methods = _methods(args.method)
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    run = load_run(args.run_dir, device=args.device)
    _applicable(methods, run.sde)
    shape = (args.n,) + tuple(run.dataset.shape)
    points = len(run.dataset.shape) == 1
    reference = None
    if points:
        from ..runtime.data import load_data
        reference = held_out(load_data(run.config.data, split="test"), args.n, torch.Generator().manual_seed(1))
    results = []
    for method in methods:
        generator = torch.Generator(run.sde._anchor.device).manual_seed(args.seed)
        started = time.perf_counter()
        with torch.no_grad():
            steps = None if method == "ode" else args.steps     # the adaptive solver picks its own steps
            out = sample(run.sde, run.model, shape, method=method, steps=steps, generator=generator,
                         **_spacing(method, args.spacing))
        x = out.x.double().cpu()
        row = dict(method=method, n=args.n, nfe=out.nfe, seconds=time.perf_counter() - started,
                   finite=bool(torch.isfinite(x).all()))
        if reference is not None and row["finite"]:
            statistic, p_value = two_sample_test(x, reference.double(), generator=torch.Generator().manual_seed(0))
            row.update(mmd=statistic, p_value=p_value)
        if args.plot:
            path = Path(args.plot)
            target = path if len(methods) == 1 else path.with_name(f"{path.stem}_{method}{path.suffix}")
            plots.save_samples(target, x.float(), run.dataset, reference=reference)
            row["plot"] = str(target)
        if args.save and method == methods[0]:
            np.save(args.save, x.numpy())
        results.append(row)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"results": results}))
        return 0
    header = ("method", "n", "NFE", "seconds") + (("MMD^2", "p (vs held-out)") if reference is not None else ())
    rows = [header]
    for r in results:
        cells = (r["method"], str(r["n"]), str(r["nfe"]), f"{r['seconds']:.2f}")
        if reference is not None:
            cells += (f"{r.get('mmd', math.nan):.2e}", f"{r.get('p_value', math.nan):.3f}")
        rows.append(cells)
    print(table(rows))
    for r in results:
        if not r["finite"]:
            print(f"warning: {r['method']} produced NaN or inf samples")
        if "plot" in r:
            print(f"plot: {r['plot']}")
    return 0


def add_nll(sub) -> None:
    p = sub.add_parser("nll", help="negative log-likelihood (bits/dim) of held-out data",
                       description="Exact likelihood through the probability-flow ODE (Hutchinson trace "
                                   "unless --exact), on the test split of the run's data.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-n", type=int, default=512, help="held-out datapoints (default 512)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per datapoint")
    p.add_argument("--exact", action="store_true", help="exact divergence (d backward passes; small d)")
    p.add_argument("--tol", type=float, default=1e-5, help="ODE rtol = atol (default 1e-5)")
    p.add_argument("--bound", action="store_true", help="also the ScoreFlow (Theorem 3) upper bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    _add_threads(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=_nll)


def _nll(args) -> int:
    from ..runtime.data import load_data
    from ..runtime.evaluate import nll
    from ..runtime.training import load_run

    _set_threads(args)
    run = load_run(args.run_dir, device=args.device)
    test = load_data(run.config.data, split="test")
    started = time.perf_counter()
    result = nll(run.model, test, n=args.n, batch=args.batch, seed=args.seed, probes=args.probes,
                 exact_trace=args.exact, rtol=args.tol, atol=args.tol, with_bound=args.bound)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps(dict(result.as_dict(), seconds=seconds)))
        return 0
    unit = "bits/dim" if test.levels is not None else "bits/dim (continuous)"
    rows = [("data", "n", "NLL (nats)", unit, "stderr", "NFE", "seconds"),
            (f"{run.config.data} (test)", str(result.n), f"{result.nll_nats:.4f}", f"{result.bpd:.4f}",
             f"{result.stderr:.4f}", f"{result.nfe:.0f}", f"{seconds:.1f}")]
    print(table(rows))
    if getattr(run.sde, "kind", "affine") == "coupled":
        print("coupled SDE: the NLL is -E[log p(x, v0) - log q(v0)] over the auxiliary components' initial law q, "
              "an upper bound on -log p(x)")
    if result.bound_nats is not None:
        print(f"ScoreFlow bound: {result.bound_nats:.4f} nats, {result.bound_bpd:.4f} bits/dim (>= NLL up to noise)")
    return 0
