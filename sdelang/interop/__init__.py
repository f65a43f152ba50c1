"""Adapters between compiled sdelang modules and other diffusion libraries (docs/interop.md).

One module per library; none of them is imported here, so `import sdelang.interop` needs torch only:

- `kdiffusion`: k-diffusion's sigma-parameterised denoiser and sigma schedules for any affine SDE.
- `scoresde`: what score_sde_pytorch's losses, samplers and likelihood need from a compiled module.
- `diffusers`: a diffusers scheduler for any affine SDE (needs the `interop` extra).
- `ddpm`: the other way, a .sde program from a diffusers DDPM beta schedule.
"""
