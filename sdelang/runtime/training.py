"""Training a score model for a compiled SDE, with resumable runs.

A run directory holds everything needed to continue or to use the model:

    run.json        the configuration, the SDE's source text and the data's shape (written once)
    checkpoint.pt   step, model, EMA, optimizer and random-generator states (replaced atomically)
    loss.csv        step, loss (the mean of every logged interval)
    loss.png, samples_<step>.png, eval.csv (periodic NLL of held-out data)

One seeded torch.Generator draws every batch, time and noise, and its state is checkpointed, so a run
resumed from a checkpoint continues exactly as an uninterrupted one. Under torchrun (DDP), each
process draws from its own generator stream, gradients are averaged, and process 0 writes the files.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..files import atomic_open, write_atomic
from .data import load_data
from ..loader import load
from .config import TrainConfig
from .losses import LOSSES, resolve_objective
from .kinds import kind_of
from .models import ScoreModel, build_model

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.pt"


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
    """torch.save, atomically (compiler.atomic_open): a crash never leaves half a checkpoint."""
    with atomic_open(path) as file:
        torch.save(state, file)


def _write_config(out: Path, config: TrainConfig) -> None:
    write_atomic(out / RUN_FILE, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def read_config(out: Path) -> TrainConfig:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not a run directory (no {RUN_FILE}); train one with `sdelang train`")
    return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))


def load_run(out: str | os.PathLike, device: str | None = None) -> Trained:
    """The EMA model of the latest checkpoint in run directory `out`."""
    out = Path(out)
    config = read_config(out)
    if device is not None:
        config = replace(config, device=device)
    if not (out / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{out} has no {CHECKPOINT} yet; train first")
    state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    dataset = load_data(config.data, split="train")
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
    sde = _load_sde(config)
    config = replace(config, objective=resolve_objective(sde, config.objective))
    state = None
    if (out / CHECKPOINT).is_file():
        previous = read_config(out)
        if not previous.same_run(config):
            raise ValueError(f"{out} holds a different run; choose a new --out directory or delete {out}")
        state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        config = replace(config, model=previous.model)
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
    step, losses = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generators"][rank][0])
        noise.set_state(state["generators"][rank][1])
        step, losses = state["step"], [tuple(item) for item in state["losses"]]
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
            save_checkpoint(out / CHECKPOINT, dict(
                step=step, model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                generators=generators, losses=losses))
            write_atomic(out / "loss.csv", "step,loss\n" + "".join(f"{s},{v:.6g}\n" for s, v in losses))

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    running = torch.zeros((), device=config.device, dtype=torch.float64)
    since, started = 0, time.perf_counter()
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
        if step % config.log_every == 0 or step == config.steps:
            mean_loss = float(running) / since    # one sync per logging interval, not per step
            if not math.isfinite(mean_loss):
                hint = (f" or raise simulation_steps ({config.simulation_steps}): Euler-Maruyama paths of a strongly "
                        "non-linear drift can overflow" if kind_of(sde) == "general" else "")
                raise FloatingPointError(f"the training loss is {mean_loss} in the {since} steps up to step {step}; "
                                         f"lower the learning rate{hint}")
            losses.append((step, mean_loss))
            rate = since * config.batch / (time.perf_counter() - started)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4g}", samples_per_s=f"{rate:.0f}")
                bar.update(since)
            if on_log is not None:
                on_log(step, mean_loss)
            running.zero_()
            since, started = 0, time.perf_counter()
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint()
        if rank == 0 and config.plot_samples and config.sample_every and step % config.sample_every == 0 \
                and step < config.steps:
            _plot_samples(out, step, sde, ema, dataset, config.plot_samples)
        if rank == 0 and config.eval_every and step % config.eval_every == 0:
            _evaluate(out, step, ema, held_out)
    if bar is not None:
        bar.close()
    if rank == 0:
        if losses:
            plots.loss_curve(out / "loss.png", [s for s, _ in losses], [v for _, v in losses], title="training loss")
        if config.plot_samples:
            _plot_samples(out, step, sde, ema, dataset, config.plot_samples)
    ema.eval()
    return Trained(config, sde, ema, dataset, step, losses)


def _plot_samples(out: Path, step: int, sde, ema, dataset, n: int, steps: int = 100) -> None:
    from . import plots
    from .sampling import sample

    images = len(dataset.shape) == 3
    with torch.no_grad():
        x = sample(sde, ema, (min(n, 64) if images else n,) + tuple(dataset.shape), method="pc", steps=steps,
                   generator=torch.Generator(sde._anchor.device).manual_seed(step)).x
    plots.save_samples(out / f"samples_{step:06d}.png", x.float().cpu(), dataset)


def _evaluate(out: Path, step: int, ema, held_out) -> None:
    from .evaluate import nll

    result = nll(ema, held_out, n=256, seed=step)
    path = out / "eval.csv"
    previous = path.read_text(encoding="utf-8") if path.exists() else "step,nll_nats,bpd,stderr,nfe\n"
    write_atomic(path, previous + f"{step},{result.nll_nats:.6g},{result.bpd:.6g},{result.stderr:.3g},{result.nfe}\n")
