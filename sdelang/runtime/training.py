"""Training a score model for a compiled SDE, with resumable runs.

A run directory holds everything needed to continue or to use the model:

    run.json            the configuration and the SDE's source text (written once)
    checkpoint.pt       step, model, EMA, optimizer and random-generator states, the loss and evaluation
                        records, the partial loss sum of the current logging interval, and what sampling
                        needs of the data (its shape and scaling); replaced atomically
    checkpoint.prev.pt  the checkpoint before it, kept until the new one is complete
    loss.csv            step, loss (the mean of every logged interval)
    eval.csv            step, held-out NLL (with --eval-every)
    loss.png, samples_<step>.png

One seeded torch.Generator draws every batch, time and noise, and its state is checkpointed with every
record the run writes, so a run killed at any step and resumed from its checkpoint writes the same
files, bit for bit, as an uninterrupted one. Sampling from a run needs neither the data nor the folder
it was trained from. Under torchrun (DDP), each process draws from its own generator stream, gradients
are averaged, and process 0 writes the files.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import EnvironmentProblem
from ..files import atomic_open, write_atomic
from .data import Dataset, load_data
from .devices import check_device
from ..loader import load
from .config import TrainConfig
from .losses import LOSSES, resolve_objective
from .kinds import kind_of
from .models import ScoreModel, build_model

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


@dataclass
class Trained:
    """What a run directory holds, ready to sample from or evaluate."""

    config: TrainConfig
    sde: torch.nn.Module
    model: ScoreModel            # the EMA weights, in eval mode
    dataset: object
    step: int
    losses: list


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _load_sde(config: TrainConfig):
    """The configuration's SDE module, on its device and dtype."""
    source = config.sde_source if config.sde_source.endswith("\n") else config.sde_source + "\n"
    return load(source, **config.params).to(config.device, getattr(torch, config.dtype))


def _build(config: TrainConfig, sde, shape: tuple[int, ...], data_std: float | None = None):
    """The score model of a configuration for data samples of `shape` (the network is sized for the
    SDE's state, models.state_shape), on the configuration's device and dtype."""
    model_config = config.model if data_std is None else replace(config.model, data_std=data_std)
    model = build_model(sde, tuple(shape), model_config).to(config.device, getattr(torch, config.dtype))
    return model, model_config


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save, atomically (files.atomic_open): a crash never leaves half a checkpoint. The checkpoint
    it replaces is kept as checkpoint.prev.pt, a fallback should the new one be damaged later (a copy
    cut short, a disk fault)."""
    path = Path(path)
    if path.exists():  # a second name for the current checkpoint, then atomic_open replaces the first
        link = path.with_name(f".{PREVIOUS}.link")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, link)
        os.replace(link, path.with_name(PREVIOUS))
    with atomic_open(path) as file:
        torch.save(state, file)


def read_checkpoint(out: Path, name: str = CHECKPOINT) -> dict:
    """The checkpoint of run `out`; a damaged one (truncated, empty, not a checkpoint) is an
    EnvironmentProblem that names the previous good checkpoint, if there is one."""
    path = Path(out) / name
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"step", "ema"} <= state.keys():
            raise ValueError("it does not hold a training state")
        return state
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch reports damage as RuntimeError, EOFError, UnpicklingError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EnvironmentProblem(f"{path} is damaged ({reason}); {_fallback(Path(out), name)}") from None


def _fallback(out: Path, damaged: str) -> str:
    previous = out / PREVIOUS
    if damaged != PREVIOUS and previous.is_file():
        try:
            step = torch.load(previous, map_location="cpu", weights_only=True)["step"]
            return (f"the previous good checkpoint is {previous} (step {step}): move it over {damaged} "
                    "to continue from there, or start again with a new --out")
        except Exception:
            pass
    return "start again with a new --out (or delete the run directory)"


def _write_config(out: Path, config: TrainConfig) -> None:
    write_atomic(out / RUN_FILE, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def read_config(out: Path) -> TrainConfig:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not a run directory (no {RUN_FILE}); train one with `sdelang train`")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise EnvironmentProblem(f"{path} is damaged ({exc}); start again with a new --out") from None


def _data_record(dataset: Dataset) -> dict:
    """What sampling and plotting need of the training data, kept in the checkpoint (the data stay where
    they are: a moved run, or one on another machine, samples without them)."""
    return dict(name=dataset.name, kind=dataset.kind, levels=dataset.levels, shape=list(dataset.shape),
                scale=dataset.scale, shift=dataset.shift)


def _dataset_of(record: dict) -> Dataset:
    """A Dataset with the recorded shape and scaling and no rows."""
    shape = tuple(record["shape"])
    return Dataset(record["name"], torch.empty((0, *shape)), record["kind"], record["levels"], shape,
                   scale=record["scale"], shift=record["shift"])


def load_run(out: str | os.PathLike, device: str | None = None) -> Trained:
    """The EMA model of the latest checkpoint in run directory `out`."""
    out = Path(out)
    config = read_config(out)
    if device is not None:
        config = replace(config, device=device)
    check_device(config.device)
    if not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{out} has no {CHECKPOINT} yet; train first")
    state = read_checkpoint(out)
    dataset = _dataset_of(state["data"]) if "data" in state else load_data(config.data, split="train")
    sde = _load_sde(config)
    model, _ = _build(config, sde, dataset.shape)
    model.load_state_dict(state["ema"])
    return Trained(config, sde, model.eval().requires_grad_(False), dataset, state["step"], state["losses"])


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema <- decay' ema + (1 - decay') model with decay' = min(decay, (1 + step) / (10 + step)): early on the
    average forgets the random initial weights quickly, so short runs get a useful EMA too."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def _data_std(dataset, generator) -> float:
    """Standard deviation of the data in model space, from 4096 draws (the model's input scaling)."""
    return float(dataset.batch(4096, generator).std())


def train(config: TrainConfig, out: str | os.PathLike, *, progress: bool = True, on_log=None) -> Trained:
    """Train (or resume) the run in directory `out`; returns the trained EMA model.

    If `out` already holds a checkpoint of the same configuration, training continues from it up
    to `config.steps`; a different configuration is refused rather than overwritten. The objective
    "auto" is resolved by the SDE's kind first (losses.resolve_objective) and stored resolved.
    """
    from . import plots

    out = Path(out)
    rank, world = _distributed()
    if config.batch % world:
        raise ValueError(f"batch {config.batch} must be divisible by the number of processes {world}")
    check_device(config.device)
    sde = _load_sde(config)
    config = replace(config, objective=resolve_objective(sde, config.objective))
    state = None
    if (out / CHECKPOINT).is_file():
        previous = read_config(out)
        if not previous.same_run(config):
            raise ValueError(f"{out} holds a different run ({previous.difference(config)}); choose a new --out "
                             f"directory or delete {out}")
        state = read_checkpoint(out)
        config = replace(config, model=previous.model)
        if progress and rank == 0:
            print(f"resuming {out} from step {state['step']} of {config.steps}", file=sys.stderr)
    torch.manual_seed(config.seed)
    # Two streams: batches are drawn on the CPU where the data live, times and noise on the device.
    generator = torch.Generator("cpu").manual_seed(config.seed)
    noise = torch.Generator(config.device)
    dataset = load_data(config.data, split="train")
    data_std = config.model.data_std if state is not None else _data_std(dataset, generator)
    generator.manual_seed(config.seed * world + rank)
    noise.manual_seed(config.seed * world + rank + 2**31)
    model, model_config = _build(config, sde, dataset.shape, data_std)
    held_out = load_data(config.data, split="test") if config.eval_every and rank == 0 else None
    config = replace(config, model=model_config)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, losses, evaluations = 0, [], []
    running = torch.zeros((), device=config.device, dtype=torch.float64)
    since = 0    # steps summed in `running` since the last logged interval
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generators"][rank][0])
        noise.set_state(state["generators"][rank][1])
        step, losses = state["step"], [tuple(item) for item in state["losses"]]
        evaluations = [tuple(item) for item in state.get("evaluations", [])]
        running.fill_(state.get("running", 0.0))
        since = state.get("since", 0)
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_config(out, config)
    trainable = model
    if world > 1:
        trainable = torch.nn.parallel.DistributedDataParallel(model)
    objective = LOSSES[config.objective]
    options = dict(steps=config.simulation_steps) if config.objective == "sliced" else {}
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / config.warmup) if config.warmup else 1.0, last_epoch=step - 1)

    def checkpoint():
        mine = (generator.get_state(), noise.get_state())
        generators = [mine]
        if world > 1:
            generators = [None] * world
            dist.all_gather_object(generators, mine)
        if rank == 0:
            # `running` and `since`: the partial sum of the logging interval the checkpoint falls in, so
            # that the interval's mean after a resume is the uninterrupted run's, to the last bit.
            save_checkpoint(out / CHECKPOINT, dict(
                step=step, model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                generators=generators, losses=losses, evaluations=evaluations, running=float(running),
                since=since, data=_data_record(dataset)))
            write_atomic(out / "loss.csv", "step,loss\n" + "".join(f"{s},{v:.6g}\n" for s, v in losses))

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    local_batch = config.batch // world
    model.train()
    while step < config.steps:
        x0 = dataset.batch(local_batch, generator).to(config.device, getattr(torch, config.dtype), non_blocking=True)
        loss = objective(sde, trainable, x0, generator=noise, reduction=config.reduction, **options).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        schedule.step()
        _ema_update(ema, model, config.ema, step)
        running += loss.detach()
        step, since = step + 1, since + 1
        if bar is not None:
            bar.update(1)
        if step % config.log_every == 0 or step == config.steps:
            mean_loss = float(running) / since    # one sync per logging interval, not per step
            if not math.isfinite(mean_loss):
                hint = (f" or raise simulation_steps ({config.simulation_steps}; `sdelang train --simulation-steps`): "
                        "Euler-Maruyama paths of a strongly non-linear drift can overflow" if kind_of(sde) == "general"
                        else "")
                raise FloatingPointError(f"the training loss is {mean_loss} in the {since} steps up to step {step}; "
                                         f"lower the learning rate{hint}")
            losses.append((step, mean_loss))
            rate = since * config.batch / (time.perf_counter() - started)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4g}", samples_per_s=f"{rate:.0f}")
            if on_log is not None:
                on_log(step, mean_loss)
            running.zero_()
            since, started = 0, time.perf_counter()
        if rank == 0 and config.plot_samples and config.sample_every and step % config.sample_every == 0 \
                and step < config.steps:
            _plot_samples(out, step, sde, ema, dataset, config, progress=bar is not None)
        if rank == 0 and config.eval_every and step % config.eval_every == 0:
            evaluations.append(_evaluate(step, ema, held_out, progress=bar is not None))
            _write_evaluations(out, evaluations)
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint()    # after this step's evaluation, so that the checkpoint holds its record
    if bar is not None:
        bar.close()
    if rank == 0:
        if losses:
            plots.loss_curve(out / "loss.png", [s for s, _ in losses], [v for _, v in losses],
                             title=f"training loss: {config.sde_name} on {dataset.name}",
                             evaluations=[(row[0], row[2]) for row in evaluations])
        if config.plot_samples:
            _plot_samples(out, step, sde, ema, dataset, config, progress=bar is not None)
    ema.eval()
    return Trained(config, sde, ema, dataset, step, losses)


def _plot_samples(out: Path, step: int, sde, ema, dataset, config: TrainConfig, *, progress: bool = False,
                  steps: int = 100) -> None:
    """samples_<step>.png: config.plot_samples draws (images: up to 64) by config.plot_method."""
    from . import plots
    from .sampling import sample

    images = len(dataset.shape) == 3
    n = min(config.plot_samples, 64) if images else config.plot_samples
    method = config.plot_method
    with torch.no_grad():
        x = sample(sde, ema, (n,) + tuple(dataset.shape), method=method, steps=None if method == "ode" else steps,
                   generator=torch.Generator(sde._anchor.device).manual_seed(step), progress=progress).x
    nfe = "" if method == "ode" else f", {steps} steps"
    plots.save_samples(out / f"samples_{step:06d}.png", x.float().cpu(), dataset,
                       title=f"{dataset.name}, step {step}: {method}{nfe}")


def _evaluate(step: int, ema, held_out, progress: bool = False) -> tuple:
    """One eval.csv row: the held-out NLL of the EMA model at `step` (256 points, seeded by the step)."""
    from .evaluate import nll

    result = nll(ema, held_out, n=256, seed=step, progress=progress)
    return step, result.nll_nats, result.bpd, result.stderr, result.nfe


def _write_evaluations(out: Path, rows: list) -> None:
    """eval.csv from the records (kept in the checkpoint too), so a resumed run rewrites it exactly."""
    write_atomic(out / "eval.csv", "step,nll_nats,bpd,stderr,nfe\n" + "".join(
        f"{step},{nats:.6g},{bpd:.6g},{stderr:.3g},{nfe}\n" for step, nats, bpd, stderr, nfe in rows))
