"""``sdelang dequantize RUN_DIR``: fit a variational dequantiser to a trained run's score model."""
from __future__ import annotations

import time

from .commands import _add_threads, _set_threads, table


def add_dequantize(sub) -> None:
    p = sub.add_parser("dequantize", help="fit a variational dequantiser q(u | k) to a trained image run",
                       description="Train a conditional flow q(u | k) on [0, 1)^D with the run's score model "
                                   "fixed, minimising E[bound(x + u) + log q(u | k)] (ScoreFlow); writes "
                                   "RUN_DIR/dequantizer.pt, which `sdelang nll` then reports beside uniform "
                                   "dequantisation. See docs/scoreflow.md.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=32, help="hidden channels of each coupling (default 32)")
    p.add_argument("--couplings", type=int, default=4, help="affine coupling layers (default 4)")
    p.add_argument("--samples", type=int, default=1, help="bound samples per datapoint and step (default 1)")
    p.add_argument("--joint", action="store_true",
                   help="train the score network too, on the same objective (its weights are stored with q and "
                        "used by `sdelang nll` for the variational row; the run's checkpoint is left as it is)")
    p.add_argument("--score-lr", type=float, default=1e-4, help="score network learning rate with --joint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    _add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=_dequantize)


def _dequantize(args) -> int:
    from ..runtime import dequantize
    from ..runtime.data import load_data
    from ..runtime.training import load_run

    _set_threads(args)
    if min(args.steps, args.batch, args.samples) < 1 or not (args.lr > 0 and args.score_lr > 0):
        raise ValueError("--steps, --batch and --samples must be >= 1, --lr and --score-lr positive")
    run = load_run(args.run_dir, device=args.device)
    if run.dataset.levels is None:
        raise ValueError(f"{run.config.data!r} holds continuous points; variational dequantisation applies to "
                         "8-bit images (digits, patches, image folders, CIFAR-10)")
    train = load_data(run.config.data, split="train")     # the run records the data's shape, not its rows
    deq = dequantize.Dequantizer(dequantize.DequantizerConfig(tuple(train.shape), args.width, args.couplings,
                                                              train.levels))
    started = time.perf_counter()
    report = None if args.quiet else (lambda step, value: print(f"step {step}: E[bound + log q] = {value:.2f} nats",
                                                                flush=True))
    history = dequantize.fit(run.model, deq, train, steps=args.steps, batch=args.batch, lr=args.lr,
                             seed=args.seed, samples=args.samples, joint=args.joint, score_lr=args.score_lr,
                             on_log=report)
    score = {k: v.cpu() for k, v in run.model.state_dict().items()} if args.joint else None
    dequantize.save(deq.cpu().eval(), args.run_dir, args.steps, score=score)
    print(table([("run", "steps", "first objective (nats)", "last objective (nats)", "seconds"),
                 (str(args.run_dir), str(args.steps), f"{history[0][1]:.2f}", f"{history[-1][1]:.2f}",
                  f"{time.perf_counter() - started:.1f}")]))
    return 0
