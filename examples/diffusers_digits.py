"""Train a diffusers UNet2DModel on scikit-learn's 8x8 digits with a compiled SDE, and sample it.

    python examples/diffusers_digits.py --sde examples/vp.sde --steps 1000 --threads 1 --out runs/diffusers_digits

The SDE enters only through sdelang.interop.diffusers.SDEScheduler: training draws t with the .sde
file's time sampler, noises with its kernel and weights the squared noise error with its weighting;
sampling is diffusers' loop (scale_model_input, unet, scheduler.step). Any affine .sde works; one whose
weights lambda / (q v) vary widely (likelihood weighting with uniform t, e.g. cosine_vp.sde) trains
slowly in a few hundred steps: prefer score_matching weighting or `t ~ importance`. About 50 s per 300
steps on one CPU thread. Writes the model and scheduler (save_pretrained: the scheduler's config
carries the .sde source), samples.png, and prints the loss, sampling speed and pixel statistics
against held-out digits.
Needs the interop and data extras: pip install -e ".[interop,data]".
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

from sdelang.interop.diffusers import SDEScheduler
from sdelang.runtime.data import load_data
from sdelang.runtime.plots import image_grid


def tiny_unet() -> UNet2DModel:
    """A 8x8 -> 4x4 -> 8x8 U-Net of about 0.17 M parameters."""
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def train(scheduler: SDEScheduler, unet: UNet2DModel, data, steps: int, batch: int, lr: float, device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    unet.train()
    for step in range(1, steps + 1):
        x0 = data.batch(batch, generator).to(device)
        tau = scheduler.sample_timesteps(batch, generator, device=device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        noisy = scheduler.add_noise(x0, noise, tau)
        pred = unet(scheduler.scale_model_input(noisy, tau), tau).sample
        weight = scheduler.training_weight(tau).to(device)
        loss = (weight * ((pred - noise) ** 2).flatten(1).mean(1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def sample(scheduler: SDEScheduler, unet: UNet2DModel, n: int, steps: int, device, seed: int) -> torch.Tensor:
    """diffusers' loop: x from the prior, then x = step(unet(scale_model_input(x, tau), tau), tau, x)."""
    unet.eval()
    scheduler.set_timesteps(steps, device=device)
    x = scheduler.prior_sample((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed), device=device)
    for tau in scheduler.timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, tau), tau).sample, tau, x).prev_sample
    return x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sde", default="examples/vp.sde", help="the .sde program (default: score_sde's VP)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--sample-steps", type=int, default=20, help="DPM-Solver++(2M) steps (= NFE)")
    parser.add_argument("-n", type=int, default=256, help="samples to draw")
    parser.add_argument("--out", default="runs/diffusers_digits")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (1 is often fastest)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    data, held_out = load_data("digits"), load_data("digits", split="test")
    scheduler = SDEScheduler(Path(args.sde).read_text(), data_std=0.5)
    unet = tiny_unet().to(args.device)
    print(f"{Path(args.sde).name}: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
          f"{len(data)} training digits, device {args.device}")
    start = time.perf_counter()
    train(scheduler, unet, data, args.steps, args.batch, args.lr, args.device, args.seed)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")

    sample(scheduler, unet, 8, args.sample_steps, args.device, args.seed)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    x = sample(scheduler, unet, args.n, args.sample_steps, args.device, args.seed)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"sampled {args.n} digits with {args.sample_steps} NFE in {seconds:.2f} s: {args.n / seconds:.0f} samples/s")

    reference = held_out.dequantise(held_out.x)
    x = x.cpu()
    print(f"pixel mean {x.mean():.3f} (held out {reference.mean():.3f}), std {x.std():.3f} "
          f"(held out {reference.std():.3f}), finite: {bool(torch.isfinite(x).all())}")
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    print(f"wrote {image_grid(out / 'samples.png', data.from_model(x[:64]), Path(args.sde).stem)}, "
          f"{out / 'unet'}, {out / 'scheduler'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
