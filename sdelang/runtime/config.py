"""What a training run is made of: plain dataclasses, stored as JSON in the run directory.

Kept free of torch so that the command line can show defaults without importing it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

OBJECTIVES = ("auto", "denoising", "sliced")   # auto: denoising, or sliced for a general SDE (no kernel)
REDUCTIONS = ("sum", "mean")
# Step-error norms of the flow-ODE likelihood (ode.NORMS, defined there) and the default (docs/benchmarks.md,
# "Step-error norm": the measurements behind it); named here so that `sdelang nll --help` needs no torch.
ODE_NORMS = ("max", "shared", "balanced")
DEFAULT_NORM = "balanced"
# The adaptive ODE solvers (runtime/ode.py's ORDERS, where each one's order is), named here for the CLI, and the
# likelihood's default (docs/benchmarks.md, "Likelihood at equal accuracy": the measurements behind it).
ODE_SOLVERS = ("dopri5", "rk45", "rk45_pi", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
DEFAULT_LIKELIHOOD_SOLVER = "rk45_pi"
SIMULATION_STEPS = 64   # Euler-Maruyama steps from 0 to each x_t of a general SDE (no kernel to draw it from)


@dataclass(frozen=True)
class ModelConfig:
    """What to build; stored with a run so that `sdelang sample` can rebuild it."""

    kind: str = "auto"          # "mlp", "unet" or "auto" (unet for [C, H, W] data, mlp otherwise)
    width: int | None = None    # MLP hidden width / U-Net base channels; None: by the data (models.model_size)
    depth: int | None = None    # MLP residual blocks / U-Net resolution levels; None: by the data
    embedding: int = 64         # size of the time features
    data_std: float = 0.5       # s_data in the input scaling; set from the data when training starts
    dropout: float = 0.0
    blocks: int = 1             # U-Net residual blocks per level (unet.py)
    attention: int = 16         # U-Net: self-attention in the blocks at this resolution (and in the middle)
    bf16: bool = False          # U-Net: bfloat16 autocast
    channels_last: bool = False  # U-Net: NHWC activations
    compile: bool = False       # U-Net: torch.compile the forward pass
    gaussian: bool = True       # affine SDEs: a Gaussian score part beside the network (models.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("gaussian", False)   # runs stored before the Gaussian part keep their plain network
        return cls(**known)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Defaults train a 2-D toy in about a minute on a CPU."""

    sde_source: str                 # the .sde program text
    sde_name: str = "model.sde"     # its file name, for messages
    params: dict = field(default_factory=dict)
    data: str = "moons"
    steps: int = 2000
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 100               # steps of linear learning-rate warm-up
    ema: float = 0.999
    clip: float = 1.0               # gradient-norm clipping; 0 turns it off
    objective: str = "auto"         # "denoising", "sliced" or "auto" (by the SDE's kind; resolved by train)
    simulation_steps: int = SIMULATION_STEPS  # to each x_t of a general SDE (sliced objective)
    reduction: str = "sum"
    seed: int = 0
    log_every: int = 10             # steps per loss.csv row (one host sync each)
    checkpoint_every: int = 500
    sample_every: int = 0           # sample plots every k steps (0: at the end only)
    eval_every: int = 0             # NLL of held-out data every k steps (0: never during training)
    plot_samples: int = 1000        # points (images: up to 64) in each sample plot; 0: no sample plots
    plot_method: str = "pc"         # the sampler of the sample plots
    device: str = "cpu"
    dtype: str = "float32"
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch >= 1, f"batch must be >= 1, got {self.batch}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr}"),
            (0 <= self.ema < 1, f"ema must be in [0, 1), got {self.ema}"),
            (self.clip >= 0, f"clip must be >= 0, got {self.clip}"),
            (self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}"),
            (self.reduction in REDUCTIONS, f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}"),
            (self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}"),
            (min(self.log_every, self.checkpoint_every) >= 1, "log_every and checkpoint_every must be >= 1"),
            (self.simulation_steps >= 1, f"simulation_steps must be >= 1, got {self.simulation_steps}"),
            (min(self.sample_every, self.eval_every, self.warmup, self.plot_samples) >= 0,
             "sample_every, eval_every, warmup and plot_samples must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["model"] = self.model.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        data["model"] = ModelConfig.from_dict(data.get("model", {}))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def same_run(self, other: "TrainConfig") -> bool:
        """True when `other` continues this run: only the step count, logging cadence and device may
        differ (and data_std, which the run measures, and the Gaussian part, which a run made before it
        lacks)."""
        def fixed(config):
            return replace(config, steps=1, log_every=1, checkpoint_every=1, sample_every=0, eval_every=0,
                           plot_samples=0, plot_method="", device="cpu",
                           model=replace(config.model, data_std=1.0, gaussian=True))
        return fixed(self) == fixed(other)

    def difference(self, other: "TrainConfig") -> str:
        """The settings in which `other` is not the same run as this one, e.g. "lr 0.002 -> 0.001"."""
        mine, theirs = self.to_dict(), other.to_dict()
        free = {"steps", "log_every", "checkpoint_every", "sample_every", "eval_every", "plot_samples", "plot_method",
                "device"}
        changed = []
        for key in sorted(mine.keys() - free):
            a, b = mine[key], theirs.get(key)
            if key == "model":
                changed += [f"model.{k} {a[k]!r} -> {b.get(k)!r}" for k in sorted(a)
                            if k not in ("data_std", "gaussian") and a[k] != b.get(k)]
            elif key == "sde_source" and a != b:
                changed.append("the SDE's source text")
            elif a != b:
                changed.append(f"{key} {a!r} -> {b!r}")
        return ", ".join(changed) or "no setting differs"
