"""The runtime commands: ``sdelang train``, ``sdelang sample`` and ``sdelang nll``."""
from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..compiler import read_source
from ..files import CannotWrite, atomic_open
from ..compiler.check.common import MAX_STEPS
from ..text import table
from ..runtime.config import (DEFAULT_LIKELIHOOD_SOLVER, DEFAULT_NORM, ODE_NORMS, ODE_SOLVERS, OBJECTIVES, REDUCTIONS,
                              ModelConfig, TrainConfig)

# Sampler names the CLI accepts besides sampling.METHODS ("euler": k-diffusion's name for the stochastic
# Euler step, which is Euler-Maruyama on the reverse SDE).
ALIASES = {"dpm": "dpm2", "dpm1": "ddim", "reverse": "reverse_diffusion", "euler": "em"}


def default_threads(cores: int | None = None) -> int:
    """CPU threads for torch when --threads is not given: 1 on machines of up to 4 cores, else half the
    cores up to 8. torch's own default (every core) oversubscribes small and shared machines: on a
    2-core machine 50 training steps on digits took 234 s with 2 threads and 17 s with 1, and the small
    tensors of the 2-D models gain nothing from a second thread (benchmarks/threads.py measures it)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores <= 4 else min(8, cores // 2)


def _add_threads(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help=f"CPU threads for torch (default {default_threads()} here: 1 on machines of up to "
                             "4 cores, else half the cores up to 8)")


def _set_threads(args) -> None:
    threads = default_threads() if args.threads is None else args.threads
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch
    torch.set_num_threads(threads)


def _check_steps(steps: int | None, what: str) -> None:
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{what} must be between 1 and {MAX_STEPS:,}, got {steps:,}")


def add_train(sub, params) -> None:
    defaults, model = TrainConfig(sde_source=""), ModelConfig()
    p = sub.add_parser("train", help="train a score model for an SDE on a dataset",
                       description="Train a score model with the file's weighting and time sampler. "
                                   "Rerunning with the same --out resumes from its checkpoint.")
    p.add_argument("file", metavar="SDE_FILE")
    p.add_argument("--data", default=defaults.data,
                   help="moons, swissroll, checkerboard, 8gaussians, gaussian, digits (needs scikit-learn), "
                        f"a .npy file or an image folder (default {defaults.data})")
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (created; resumed if it exists)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override an SDE parameter")
    p.add_argument("--batch", type=int, default=defaults.batch,
                   help=f"training examples per optimizer step (default {defaults.batch})")
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help=f"AdamW learning rate, after {defaults.warmup} warm-up steps (default {defaults.lr})")
    p.add_argument("--ema", type=float, default=defaults.ema,
                   help=f"decay of the weights' exponential moving average, which sampling and the NLL use "
                        f"(default {defaults.ema})")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help=f"seed of every random draw: batches, times, noise, initial weights (default {defaults.seed})")
    p.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective,
                   help="denoising score matching (affine and coupled SDEs), sliced score matching (any SDE), "
                        f"or auto: by the SDE's kind (default {defaults.objective})")
    p.add_argument("--simulation-steps", type=int, default=defaults.simulation_steps,
                   help="Euler-Maruyama steps to each training time x_t of a general SDE (sliced objective); raise it "
                        f"for a stiff drift (default {defaults.simulation_steps})")
    p.add_argument("--reduction", choices=REDUCTIONS, default=defaults.reduction,
                   help="sum (the weighted score-matching integral, in nats for the likelihood weighting) "
                        f"or mean over the entries of a sample (default {defaults.reduction})")
    p.add_argument("--dtype", choices=("float32", "float64"), default=defaults.dtype,
                   help=f"floating-point type of the model and the SDE (default {defaults.dtype})")
    p.add_argument("--model", choices=("auto", "mlp", "unet"), default=model.kind,
                   help=f"score network: auto is a U-Net for images, an MLP otherwise (default {model.kind})")
    p.add_argument("--width", type=int, default=None,
                   help="MLP hidden width or U-Net base channels (default 128 for an MLP; "
                        "for images sized by the data set, see docs/runtime.md)")
    p.add_argument("--depth", type=int, default=None,
                   help="MLP residual blocks or U-Net resolution levels (default 3 for an MLP; for images "
                        "sized by the data set)")
    p.add_argument("--blocks", type=int, default=model.blocks,
                   help=f"U-Net residual blocks per level (default {model.blocks})")
    p.add_argument("--attention", type=int, default=model.attention,
                   help=f"U-Net: self-attention at this resolution (default {model.attention})")
    p.add_argument("--bf16", action="store_true", help="U-Net: bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="U-Net: NHWC activations (fast convolutions on GPUs)")
    p.add_argument("--compile", action="store_true", help="U-Net: torch.compile the forward pass")
    p.add_argument("--device", default=defaults.device, help=f"cpu, cuda, cuda:1, ... (default {defaults.device})")
    _add_threads(p)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help=f"save the checkpoint every k steps, and at the end (default {defaults.checkpoint_every})")
    p.add_argument("--sample-every", type=int, default=defaults.sample_every,
                   help="a sample plot every k steps (default 0: at the end only)")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="held-out NLL (256 points) every k steps, written to eval.csv (default 0: never)")
    p.add_argument("--plot-samples", type=int, default=defaults.plot_samples,
                   help=f"points in each sample plot, images up to 64; 0 turns the sample plots off "
                        f"(default {defaults.plot_samples})")
    p.add_argument("--plot-method", default=defaults.plot_method,
                   help=f"sampler of the sample plots, any name `sdelang sample --method` takes "
                        f"(default {defaults.plot_method})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=lambda args: _train(args, params))


def _train(args, params) -> int:
    from ..runtime.training import train

    from ..loader import check_values

    _set_threads(args)
    source = read_source(args.file)
    check_values(source, params(args.param))   # names and values as `compile --param` takes them
    sizes = {k: v for k, v in (("width", args.width), ("depth", args.depth)) if v is not None}
    sizes.update(blocks=args.blocks, attention=args.attention, bf16=args.bf16, channels_last=args.channels_last,
                 compile=args.compile)
    config = TrainConfig(
        sde_source=source.text, sde_name=Path(args.file).name, params=params(args.param), data=_data_spec(args.data),
        steps=args.steps, batch=args.batch, lr=args.lr, ema=args.ema, seed=args.seed, objective=args.objective,
        reduction=args.reduction, simulation_steps=args.simulation_steps, dtype=args.dtype, device=args.device,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every, eval_every=args.eval_every, plot_samples=args.plot_samples,
        plot_method=_methods(args.plot_method)[0], model=ModelConfig(kind=args.model, **sizes))
    if int(os.environ.get("RANK", "0")) == 0:
        from ..loader import load
        warn_failed_checks(load(source.text, **config.params), args.file)
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


def warn_failed_checks(sde, name: str) -> None:
    """The quick rows of `sdelang check` (no Monte Carlo, about 0.1 s): a warning on standard error for
    each that fails, so that a module with a wrong number is never used without a word."""
    from ..verify import quick_checks

    for row in quick_checks(sde):
        print(f"warning: {name}: check '{row.name}' failed (measured {row.measured:.3g}, tolerance "
              f"{row.tolerance:.3g}; {row.note}); run `sdelang check {name}` for the full report", file=sys.stderr)


def _data_spec(data: str) -> str:
    """A data file or folder by its absolute path, so that the run resumes and evaluates from any folder."""
    path = Path(data)
    return str(path.resolve()) if path.suffix == ".npy" or path.is_dir() or path.is_file() else data


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
                                                  "ancestral, ald, ode, heun, ddim, dpm2 (dpm = dpm2), dpmpp_2m, "
                                                  "dpmpp_3m, dpmpp_3m_published, unipc, unipc_3m, deis, lms, "
                                                  "dpmpp_2m_sde, dpmpp_3m_sde, "
                                                  "splitting and exponential (coupled SDEs); a coupled or general "
                                                  "SDE takes em, pc, ode, heun")
    p.add_argument("--steps", type=int, default=None,
                   help="time steps of the fixed-step methods (default: the SDE's N); not for ode, which is adaptive")
    p.add_argument("-n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--spacing", choices=("time", "logsnr", "edm", "floored"), default=None,
                   help="time grid of the fixed-step methods: uniform in t, in logSNR, EDM's rho = 7 "
                        "schedule, or floored (logSNR above the noise level 1e-3, sigma below it) (default: each "
                        "method's own; logsnr suits SDEs whose noise level spans decades, such as EDM-style VE)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior draw and the noise (default 0)")
    p.add_argument("--plot", metavar="PNG", help="write a scatter plot or image grid (one per method)")
    p.add_argument("--save", metavar="NPY", help="write the samples of the first method as a .npy file")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the run's)")
    _add_threads(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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


def _npy(path: str) -> str:
    """The file np.save(path) writes: path with .npy appended unless it ends so."""
    return path if path.endswith(".npy") else path + ".npy"


def _writable(path: str | None) -> None:
    """A CannotWrite (exit 2, one line) unless path's folder exists or can be made there: its nearest existing
    ancestor must be a folder this process may write in (atomic_open makes the missing folders)."""
    if path is None:
        return
    folder = Path(path).absolute().parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise CannotWrite(f"cannot write {path}: {existing} is a file, not a folder", errno.ENOTDIR)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CannotWrite(f"cannot write {path}: no permission to write in {existing}", errno.EACCES)


def _sample(args) -> int:
    import numpy as np
    import torch

    from ..runtime import plots
    from ..runtime.evaluate import OUTLIER_RADIUS, held_out, outliers, two_sample_test
    from ..runtime.sampling import sample
    from ..runtime.training import load_run

    _set_threads(args)
    methods = _methods(args.method)
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    _check_steps(args.steps, "--steps")
    if args.steps is not None and "ode" in methods:
        raise ValueError("--steps does not apply to 'ode' (the adaptive solver chooses its steps); sample ode "
                         "on its own without --steps, or choose a fixed-step method such as heun or dpm2")
    for target in (_npy(args.save) if args.save else None, args.plot):
        _writable(target)   # before sampling, not after it
    run = load_run(args.run_dir, device=args.device)
    _applicable(methods, run.sde)
    warn_failed_checks(run.sde, run.config.sde_name)
    if args.steps is None and any(m != "ode" for m in methods):
        _check_steps(run.sde.N, f"the SDE's step count N ({run.config.sde_name})")
    shape = (args.n,) + tuple(run.dataset.shape)
    reference = _reference(run, args.n) if len(run.dataset.shape) == 1 else None
    results, panels = [], []
    for method in methods:
        generator = torch.Generator(run.sde._anchor.device).manual_seed(args.seed)
        started = time.perf_counter()
        with torch.no_grad(), _counting(run.model, method, adaptive=method == "ode" and not args.quiet) as score:
            out = sample(run.sde, score, shape, method=method, steps=args.steps, generator=generator,
                         progress=not args.quiet, **_spacing(method, args.spacing))
        x = out.x.double().cpu()
        far, radius = outliers(x, run.model.data_std)
        row = dict(method=method, n=args.n, nfe=out.nfe, seconds=time.perf_counter() - started,
                   finite=bool(torch.isfinite(x).all()), outliers=far, outlier_radius=radius)
        if reference is not None and row["finite"]:
            statistic, p_value = two_sample_test(x, reference.double(), generator=torch.Generator().manual_seed(0))
            row.update(mmd=statistic, p_value=p_value)
        if args.plot:
            panels.append((_subtitle(row, args.steps if method != "ode" else None), x.float()))
            row["plot"] = str(args.plot)
        if args.save and method == methods[0]:
            with atomic_open(_npy(args.save)) as file:   # np.save to a file object adds no suffix: _npy does
                np.save(file, x.numpy())
        results.append(row)
    if args.plot:   # one figure, a panel per method (and held-out images first, for image data)
        plots.save_panels(args.plot, panels, run.dataset, title=f"{run.config.data}: {run.config.sde_name}",
                          reference=reference if reference is not None else _reference_images(run))
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"results": results}))
        return 0
    header = ("method", "n", "NFE", "seconds", "outliers") + (("MMD^2", "p (vs held-out)") if reference is not None else ())
    rows = [header]
    for r in results:
        cells = (r["method"], str(r["n"]), str(r["nfe"]), f"{r['seconds']:.2f}", str(r["outliers"]))
        if reference is not None:
            cells += (f"{r.get('mmd', math.nan):.2e}", f"{r.get('p_value', math.nan):.3f}")
        rows.append(cells)
    print(table(rows))
    for r in results:
        if not r["finite"]:
            print(f"warning: {r['method']} produced NaN or inf samples")
        if r["outliers"]:
            print(f"warning: {r['method']}: {r['outliers']} of {r['n']} samples lie beyond |x| = "
                  f"{r['outlier_radius']:.2f} ({OUTLIER_RADIUS:g} data standard deviations x sqrt(d)), where no data "
                  f"are: {_outlier_cause(r['method'])} (docs/runtime.md, 'Outliers')")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _outlier_cause(method: str) -> str:
    """The likely causes of samples far from the data, for the kind of sampler that drew them."""
    from ..runtime.sampling.common import DETERMINISTIC

    common = ("a prior that does not match the SDE's p_T (`sdelang check` compares them) or a score poorly learned "
              "far from the data")
    if method in DETERMINISTIC:
        return f"{common}; a deterministic sampler follows the learned flow and carries the prior's tails with it"
    return f"{common}; too few steps of this stochastic sampler can add to it"


@contextlib.contextmanager
def _counting(model, method: str, adaptive: bool):
    """The score model, counting its evaluations on a progress bar when `adaptive` (the ODE solver picks
    its own steps, so the fixed-step samplers' bar has no total to show)."""
    if not adaptive:
        yield model
        return
    from tqdm.auto import tqdm

    with tqdm(desc=method, unit="NFE", leave=False, dynamic_ncols=True) as bar:
        def score(x, t):
            bar.update(1)
            return model(x, t)
        yield score


def _subtitle(row: dict, steps: int | None) -> str:
    """'pc, 100 steps, NFE 201, p = 0.42' for a panel."""
    parts = [row["method"]] + ([f"{steps} steps"] if steps else []) + [f"NFE {row['nfe']}"]
    if "p_value" in row:
        parts.append(f"p = {row['p_value']:.2f}")
    return ", ".join(parts)


def _reference_images(run):
    """Up to 64 held-out images (8-bit values) to show beside generated ones, or None."""
    if run.dataset.kind != "image":
        return None
    from ..runtime.data import load_data

    try:
        return load_data(run.config.data, split="test").x[:64]
    except (OSError, ValueError, ImportError):
        return None


def _reference(run, n: int):
    """n held-out points for the two-sample test, or None (with a note) when the run's data cannot be read
    here: sampling itself needs no data."""
    import torch

    from ..runtime.data import load_data
    from ..runtime.evaluate import held_out

    try:
        return held_out(load_data(run.config.data, split="test"), n, torch.Generator().manual_seed(1))
    except (OSError, ValueError, ImportError) as exc:
        print(f"note: no two-sample test: the run's data {run.config.data!r} cannot be read here ({exc})",
              file=sys.stderr)
        return None


def add_nll(sub) -> None:
    p = sub.add_parser("nll", help="negative log-likelihood (bits/dim) of held-out data",
                       description="Exact likelihood through the probability-flow ODE (Hutchinson trace "
                                   "unless --exact), on the test split of the run's data.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-n", type=int, default=512, help="held-out datapoints (default 512)")
    p.add_argument("--batch", type=int, default=256,
                   help="datapoints per ODE solve; more is faster until memory runs out (default 256)")
    p.add_argument("--probes", type=int, default=1,
                   help="Hutchinson probes per datapoint: more lowers the trace estimator's variance (default 1)")
    p.add_argument("--exact", action="store_true", help="exact divergence (d backward passes; small d)")
    p.add_argument("--tol", type=float, default=1e-5, help="ODE rtol = atol (default 1e-5)")
    p.add_argument("--norm", choices=ODE_NORMS, default=DEFAULT_NORM,
                   help="how the step errors of x and of the log-density combine: balanced (the RMS of the two "
                        "mean squares), max (the larger RMS; stricter on log p, more steps) or shared (one RMS "
                        "over all entries, scipy's) (default %(default)s)")
    p.add_argument("--solver", choices=ODE_SOLVERS, default=DEFAULT_LIKELIHOOD_SOLVER,
                   help="adaptive ODE solver: rk45_pi (Dormand-Prince 5(4), scipy RK45's error estimate, PI step "
                        "control), rk45 (scipy's RK45 as score_sde uses it; with --norm shared its very steps), "
                        "torchdiffeq's dopri5, dopri8, ... (default %(default)s)")
    p.add_argument("--bound", action="store_true",
                   help="also ScoreFlow's upper bound on the NLL of the SDE model (Theorem 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out choice and the probes (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the run's)")
    _add_threads(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_nll)


def _nll(args) -> int:
    from ..runtime import dequantize
    from ..runtime.data import load_data
    from ..runtime.evaluate import nll
    from ..runtime.training import load_run

    _set_threads(args)
    run = load_run(args.run_dir, device=args.device)
    test = load_data(run.config.data, split="test")
    learned = dequantize.load(args.run_dir)     # written by `sdelang dequantize`; None without one
    options = dict(n=args.n, batch=args.batch, seed=args.seed, probes=args.probes, exact_trace=args.exact,
                   rtol=args.tol, atol=args.tol, norm=args.norm, method=args.solver, with_bound=args.bound,
                   progress=not args.quiet)
    started = time.perf_counter()
    result = nll(run.model, test, **options)
    seconds = time.perf_counter() - started
    results = [("uniform", result, seconds)]
    if learned is not None:
        started = time.perf_counter()
        model = run.model
        joint = dequantize.load_score(args.run_dir)     # score weights trained together with q (--joint)
        if joint is not None:
            model = copy.deepcopy(run.model)
            model.load_state_dict(joint)
        results.append(("variational" if joint is None else "variational (joint)",
                        nll(model, test, dequantizer=learned, **options), time.perf_counter() - started))
    if args.json:
        if learned is None:
            print(json.dumps(dict(result.as_dict(), seconds=seconds)))
        else:
            print(json.dumps({name.split()[0]: dict(r.as_dict(), seconds=s) for name, r, s in results}))
        return 0
    unit = "bits/dim" if test.levels is not None else "bits/dim (continuous)"
    rows = [("data", "dequantisation", "n", "NLL (nats)", unit, "stderr", "NFE", "seconds")]
    rows += [(f"{run.config.data} (test)", name if test.levels is not None else "-", str(r.n), f"{r.nll_nats:.4f}",
              f"{r.bpd:.4f}", f"{r.stderr:.4f}", f"{r.nfe:.0f}", f"{s:.1f}") for name, r, s in results]
    print(table(rows))
    if getattr(run.sde, "kind", "affine") == "coupled":
        print("coupled SDE: the NLL is -E[log p(x, v0) - log q(v0)] over the auxiliary components' initial law q, "
              "an upper bound on -log p(x)")
    for name, r, _ in results:
        if r.bound_nats is not None:
            label = f" ({name} dequantisation)" if learned is not None else ""
            print(f"ScoreFlow bound{label}: {r.bound_nats:.4f} nats, {r.bound_bpd:.4f} bits/dim (stderr "
                  f"{r.bound_stderr:.4f}): an upper bound on the NLL of the SDE model (the reverse SDE with this "
                  "score); the NLL above is the flow ODE's, a different model, so the bound may fall below it when "
                  "the score is not exact")
    return 0
