"""Build the SDE gallery (docs/zoo.md): every gallery SDE compiled, checked, trained and evaluated alike.

    python docs/zoo/build.py [--steps N] [--only NAME ...] [--out DIR] [--doc FILE]

For each SDE of GALLERY (examples/<name>.sde), one protocol, the same for all:

1. compile it (sdelang.compile_source): its kind, how the kernel was derived, the compile time;
2. run `sdelang check`'s checks (sdelang.verify.run_checks, data N(0, 1) per coordinate, moons' scale):
   counts of ok / warn / n/a / FAIL, and its KL(p_T || prior);
3. train on moons with the runtime (sdelang.runtime.training.train; the objective defaults by kind);
4. held-out NLL by the flow ODE with the exact trace (sdelang.runtime.evaluate.nll; for a coupled SDE the
   upper bound -[log p(x, v0) - log q(v0)], the entropy of v0 subtracted), and samples by em and by one
   more method (splitting for coupled SDEs, the adaptive flow ODE otherwise), each with a kernel
   two-sample test (MMD, permutation p-value) against held-out points;
5. <out>/<name>.png: both samplers' points over the held-out data (written atomically).

<out>/results.json collects the protocol and one row per SDE (an --only run replaces its rows and keeps
the others, if the protocol is the same), and the table between the markers of --doc is rewritten from
it. A stage that raises for one SDE is recorded in its row as "error", the build moves on, and the exit
status is 1.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from sdelang import load, verify
from sdelang.compiler import compile_source, read_source
from sdelang.files import atomic_open, write_atomic
from sdelang.runtime.config import ModelConfig, TrainConfig
from sdelang.runtime.data import load_data
from sdelang.runtime.evaluate import nll, two_sample_test
from sdelang.runtime.sampling import methods_for, sample
from sdelang.runtime.training import train

ROOT = Path(__file__).resolve().parents[2]
GALLERY = ("ve", "vp", "subvp", "cosine_vp", "edm_ve", "ou", "cld", "underdamped", "cubic_langevin",
           "rectified_flow", "vdm", "edm_vp")
BASELINES = ("ve", "vp", "subvp")   # score_sde's three SDEs: the rows the others are compared with
START = "<!-- zoo-table: start (docs/zoo/build.py rewrites everything down to the end marker) -->"
END = "<!-- zoo-table: end -->"
DATA_STD = 1.0          # the toy sets are standardised to E|x|^2 / 2 = 1: per coordinate, about N(0, 1)
PERMUTATIONS = 200      # of the two-sample test: p-values on a grid of 1/201
STATUSES = (verify.OK, verify.WARN, verify.NA, verify.FAIL)  # of sdelang check's rows, in the table's order


@dataclass(frozen=True)
class Protocol:
    """The budget every SDE gets; stored in results.json, so that rows built apart stay comparable."""

    data: str = "moons"
    steps: int = 1500
    batch: int = 256
    width: int = 128
    seed: int = 0
    nll_points: int = 500
    samples: int = 1000
    sample_steps: int | None = None     # fixed-step samplers; None: each module's own N
    check_paths: int = 32768
    device: str = "cpu"
    dtype: str = "float32"


def compile_stage(name: str) -> dict:
    """Compile examples/<name>.sde from scratch (no cache), for its derivation and the compile time."""
    started = time.perf_counter()
    compiled = compile_source(read_source(ROOT / "examples" / f"{name}.sde"))
    return dict(compile_s=time.perf_counter() - started, kernel=compiled.derivation.kernel_path,
                sympy_timeouts=compiled.timeouts)


def check_stage(sde, protocol: Protocol) -> dict:
    """sdelang check's rows, summarised: counts by status, warnings and failures with their notes, and
    KL(p_T || prior) (None where the check is n/a); for a general SDE it is an estimate from simulated
    paths (no kernel)."""
    started = time.perf_counter()
    rows = verify.run_checks(sde, paths=protocol.check_paths, seed=protocol.seed, data_std=DATA_STD)
    counts = {status: sum(r.status == status for r in rows) for status in STATUSES}
    kl = next((r.measured for r in rows if r.name == "KL(p_T || prior)" and r.status != verify.NA), None)
    return dict(check_s=time.perf_counter() - started, passed=verify.passed(rows), counts=counts,
                warnings=[f"{r.name}: {r.note}" for r in rows if r.status == verify.WARN],
                failures=[f"{r.name}: {r.note}" for r in rows if r.status == verify.FAIL],
                kl_prior_nats=kl, kl_simulated=sde.kind == "general")


def second_method(sde) -> str:
    """The sampler to compare with em: the coupled SDEs' splitting, else the adaptive flow ODE."""
    return "splitting" if "splitting" in methods_for(sde) else "ode"


def frame_of(points):
    """The plotted frame: the points' extent with a 5 % margin per side (as sdelang.runtime.plots.scatter)."""
    low, high = points.min(0).values, points.max(0).values
    margin = 0.05 * (high - low)
    return low - margin, high + margin


def sample_stage(run, method: str, protocol: Protocol, reference, frame) -> tuple[dict, object]:
    """`protocol.samples` samples by `method`, their two-sample test against `reference`, and how many
    fell outside `frame` (low, high), i.e. far from every held-out point."""
    generator = torch.Generator(run.sde._anchor.device).manual_seed(protocol.seed)
    steps = None if method == "ode" else (protocol.sample_steps or run.sde.N)
    started = time.perf_counter()
    with torch.no_grad():
        out = sample(run.sde, run.model, (protocol.samples,) + tuple(run.dataset.shape), method=method,
                     steps=steps, generator=generator)
    x = out.x.double().cpu()
    finite = torch.isfinite(x).all(1)
    x = x[finite]
    low, high = frame
    row = dict(method=method, steps=steps, nfe=out.nfe, seconds=time.perf_counter() - started,
               non_finite=int((~finite).sum()), outside=int((~((x >= low) & (x <= high)).all(1)).sum()),
               mmd=None, p_value=None)
    if len(x) >= 2:  # the test needs two points; non_finite says how many were lost
        row["mmd"], row["p_value"] = two_sample_test(x, reference.double(), permutations=PERMUTATIONS,
                                                     generator=torch.Generator().manual_seed(protocol.seed))
    return row, x


def plot_samples(path: Path, name: str, panels: list[tuple[dict, object]], reference, frame) -> None:
    """One scatter per sampler, side by side over the held-out points (grey), in the held-out data's frame;
    samples outside it are counted in the panel's label. Written atomically."""
    low, high = (v.numpy() for v in frame)
    reference = reference.numpy()
    fig = Figure(figsize=(4 * len(panels), 3.2), dpi=100, layout="constrained")
    for i, (row, x) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.6", alpha=0.5, linewidths=0)
        x = x.numpy()
        ax.scatter(x[:, 0], x[:, 1], s=2, c="C0", alpha=0.6, linewidths=0)
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
        ax.set_aspect("equal")
        steps = "adaptive" if row["steps"] is None else f"{row['steps']} steps"
        ax.set_title(f"{row['method']} ({steps}): p = {_number(row['p_value'])}", fontsize="medium")
        lost = row["outside"] + row["non_finite"]
        ax.set_xlabel(f"{len(x)} samples" + (f", {lost} outside the frame" if lost else ""), fontsize="small")
    fig.suptitle(f"{name} on moons: samples (blue) over held-out data (grey)")
    with atomic_open(path) as file:
        fig.savefig(file, format="png")


def gaussian_reference(protocol: Protocol) -> dict:
    """NLL of the held-out points under the Gaussian fitted to the training set: what any model of the
    table should beat."""
    points = load_data(protocol.data, split="train").x.double()
    held_out = load_data(protocol.data, split="test").x[:protocol.nll_points].double()
    fit = torch.distributions.MultivariateNormal(points.mean(0), torch.cov(points.T))
    losses = -fit.log_prob(held_out)
    return dict(nll_nats=float(losses.mean()), nll_stderr=float(losses.std() / math.sqrt(len(losses))))


def build_one(name: str, protocol: Protocol, out: Path, runs: Path) -> dict:
    """Every stage of the protocol for examples/<name>.sde; the row of results.json."""
    row = dict(name=name, source=f"examples/{name}.sde", baseline=name in BASELINES)
    try:
        row.update(compile_stage(name))
        source = (ROOT / "examples" / f"{name}.sde").read_text(encoding="utf-8")
        sde = load(source)  # by its text, as training loads it: one cached compilation serves both
        row.update(kind=sde.kind, weighting=sde.weighting, t_sampling=sde.t_sampling)
        row["check"] = check_stage(sde, protocol)
        config = TrainConfig(sde_source=source, sde_name=f"{name}.sde", data=protocol.data, steps=protocol.steps,
                             batch=protocol.batch, seed=protocol.seed, plot_samples=0, device=protocol.device,
                             dtype=protocol.dtype, model=ModelConfig(width=protocol.width))
        started = time.perf_counter()
        run = train(config, runs / name, progress=False)
        row.update(objective=run.config.objective, train_s=time.perf_counter() - started,
                   final_loss=run.losses[-1][1])
        held_out = load_data(protocol.data, split="test")
        started = time.perf_counter()
        result = nll(run.model, held_out, n=protocol.nll_points, exact_trace=True, seed=protocol.seed)
        dims = held_out.x[0].numel()
        row["nll"] = dict(nats=result.nll_nats, stderr=result.stderr * dims * math.log(2), bpd=result.bpd,
                          bpd_stderr=result.stderr, nfe=result.nfe, n=result.n, seconds=time.perf_counter() - started,
                          upper_bound=sde.kind == "coupled")
        frame = frame_of(held_out.x.double())
        panels = [sample_stage(run, method, protocol, held_out.x[:protocol.samples], frame)
                  for method in ("em", second_method(run.sde))]
        row["samples"] = [sample for sample, _ in panels]
        plot_samples(out / f"{name}.png", name, panels, held_out.x, frame)
        row["plot"] = f"{name}.png"
    except Exception as exc:  # recorded in the row: one SDE's failure must not lose the others' results
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _check_cell(check: dict) -> str:
    counts = check["counts"]  # in a fixed order: results.json stores its keys sorted
    cell = ", ".join(f"{counts[status]} {status}" for status in STATUSES if counts[status])
    return cell if check["passed"] else f"**FAILED**: {cell}"


def _kl_cell(check: dict) -> str:
    value = check["kl_prior_nats"]
    return "n/a" if value is None else f"{value:.2g}" + (" (a)" if check["kl_simulated"] else "")


def _p_cell(sample: dict) -> str:
    lost = [f"{sample[key]} {label}" for key, label in (("outside", "far"), ("non_finite", "non-finite"))
            if sample[key]]
    return _number(sample["p_value"]) + "".join(f", {item}" for item in lost)


def render_table(results: dict) -> str:
    """The Markdown table of results.json, rows in GALLERY order (unknown names after them)."""
    rows = results["rows"]
    order = [n for n in GALLERY if n in rows] + sorted(n for n in rows if n not in GALLERY)
    head = ("| SDE | kind | kernel | `sdelang check` | KL(p_T ‖ prior) nats/dim | train s | NLL nats (± se) "
            "| bits/dim | flow NFE | p, em | p, 2nd method |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name in order:
        r = rows[name]
        label = f"`{name}`" + (" (baseline)" if r.get("baseline") else "")
        if "error" in r:
            lines.append(f"| {label} | {r.get('kind', '?')} | | | | | **failed**: {r['error'][:200]} | | | | |")
            continue
        nll = r["nll"]
        bound = " (b)" if nll["upper_bound"] else ""
        em, other = r["samples"]
        lines.append(f"| {label} | {r['kind']} | {r['kernel']} | {_check_cell(r['check'])} | {_kl_cell(r['check'])} "
                     f"| {r['train_s']:.0f} | {nll['nats']:.2f} ± {nll['stderr']:.2f}{bound} | {nll['bpd']:.2f} "
                     f"| {nll['nfe']:.0f} | {_p_cell(em)} | {_p_cell(other)} ({other['method']}) |")
    p = results["protocol"]
    g = results["gaussian_fit"]
    steps = "each module's N" if p["sample_steps"] is None else p["sample_steps"]
    notes = [
        f"Protocol: {p['data']}, {p['steps']} training steps, batch {p['batch']}, MLP width {p['width']}, seed "
        f"{p['seed']}, {p['dtype']} on {p['device']}; NLL of {p['nll_points']} held-out points (exact trace); "
        f"{p['samples']} samples per method ({steps} steps for em and splitting), two-sample test against "
        f"{p['samples']} held-out points with {PERMUTATIONS} permutations. The Gaussian fitted to the "
        f"training set has held-out NLL {g['nll_nats']:.2f} ± {g['nll_stderr']:.2f} nats.",
        "(a) `sdelang check`'s estimate from a Gaussian fit of p_T simulated by Euler-Maruyama (no kernel);"
        " (b) an upper bound on the NLL: -[log p(x, v0) - log q(v0)], the entropy of v0 subtracted"
        " (Dockhorn et al. 2022).",
    ]
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def table_span(doc: Path) -> tuple[str, int, int]:
    """The page's text and where its table lies: after START, up to END."""
    text = doc.read_text(encoding="utf-8")
    begin, end = text.find(START), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"{doc} has no table markers; put these two lines where the table goes:\n{START}\n{END}")
    return text, begin + len(START), end


def rewrite_doc(doc: Path, table: str) -> None:
    """Replace what lies between START and END in `doc` with `table` (atomically)."""
    text, begin, end = table_span(doc)
    write_atomic(doc, text[:begin] + "\n" + table + text[end:])


def refuse_other_protocol(previous: dict | None, protocol: Protocol) -> None:
    """Rows built under another protocol would not compare with this build's: refuse to mix them."""
    if previous is not None and previous["protocol"] != asdict(protocol):
        raise ValueError(f"results.json holds rows of another protocol ({previous['protocol']}); rebuild every "
                         "SDE (leave out --only) or pass the options it was built with")


def merge(previous: dict | None, protocol: Protocol, rows: list[dict], reference: dict) -> dict:
    """results.json after this build: its rows replace those of the same names in `previous` (of the same
    protocol), whose other rows are kept."""
    refuse_other_protocol(previous, protocol)
    kept = {} if previous is None else previous["rows"]
    return dict(protocol=asdict(protocol), gaussian_fit=reference, rows={**kept, **{r["name"]: r for r in rows}})


def parse_args(argv):
    defaults = Protocol()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=GALLERY, metavar="NAME",
                        help=f"build these SDEs only (of {', '.join(GALLERY)}); the others' rows are kept")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--width", type=int, default=defaults.width, help="MLP hidden width")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--nll-points", type=int, default=defaults.nll_points)
    parser.add_argument("--samples", type=int, default=defaults.samples, help="samples per method")
    parser.add_argument("--sample-steps", type=int, default=None, help="em and splitting steps (default: N)")
    parser.add_argument("--check-paths", type=int, default=defaults.check_paths, help="sdelang check's paths")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", choices=("float32", "float64"), default=defaults.dtype)
    # One thread by default: the models are small, and a second OpenMP thread spin-waits on a busy machine.
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "zoo", help="plots and results.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "zoo.md", help="the page whose table is rewritten")
    args = parser.parse_args(argv)
    # nll and the two-sample test need 2 points, sdelang check 100 paths
    minimums = dict(steps=1, batch=1, width=1, nll_points=2, samples=2, check_paths=100, threads=1)
    for option, minimum in minimums.items():
        if getattr(args, option) < minimum:
            parser.error(f"--{option.replace('_', '-')} must be >= {minimum}, got {getattr(args, option)}")
    if args.sample_steps is not None and args.sample_steps < 1:
        parser.error(f"--sample-steps must be >= 1, got {args.sample_steps}")
    if not args.doc.is_file():
        parser.error(f"no such page: {args.doc}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    protocol = Protocol(data="moons", steps=args.steps, batch=args.batch, width=args.width, seed=args.seed,
                        nll_points=args.nll_points, samples=args.samples, sample_steps=args.sample_steps,
                        check_paths=args.check_paths, device=args.device, dtype=args.dtype)
    results_path = args.out / "results.json"
    previous = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() and args.only else None
    try:  # bad input is refused before any training, not after it
        refuse_other_protocol(previous, protocol)
        table_span(args.doc)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdelang-zoo-") as runs:
        for name in args.only or GALLERY:
            started = time.perf_counter()
            row = build_one(name, protocol, args.out, Path(runs))
            row["total_s"] = time.perf_counter() - started
            print(f"{name}: {row.get('error') or 'NLL %.3f nats' % row['nll']['nats']} ({row['total_s']:.0f} s)",
                  flush=True)
            rows.append(row)
    results = merge(previous, protocol, rows, gaussian_reference(protocol))
    write_atomic(results_path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    rewrite_doc(args.doc, render_table(results))
    failed = [r["name"] for r in rows if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)} (see results.json)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
