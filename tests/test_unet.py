"""The DDPM++-style U-Net: attention where asked, skip rescaling, zero-initialised outputs, and its options."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from sdelang.runtime.config import ModelConfig
from sdelang.runtime.models import MLP_SIZE, build_model, model_size
from sdelang.runtime.unet import Attention, ResidualBlock, UNet


def _randomise(net, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def test_attention_runs_at_the_asked_resolution_and_in_the_middle():
    config = ModelConfig(kind="unet", width=8, depth=3, embedding=8, blocks=2, attention=16)
    net = UNet(3, 32, config)
    seen = []
    for module in net.modules():
        if isinstance(module, Attention):
            module.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].shape[-1]))
    out = net(torch.randn(2, 3, 32, 32), torch.rand(2))
    assert out.shape == (2, 3, 32, 32)
    # 16x16 is level 1: blocks (2) on the way down and blocks + 1 (3) on the way up; the middle at 8x8
    assert sorted(seen) == [8] + [16] * 5
    assert len(UNet(3, 32, ModelConfig(width=8, depth=3, embedding=8, attention=4)).attend) == 0


def test_untrained_network_predicts_zero_and_blocks_rescale_their_sum():
    net = UNet(1, 8, ModelConfig(width=8, depth=2, embedding=8))
    assert torch.equal(net(torch.randn(3, 1, 8, 8), torch.rand(3)), torch.zeros(3, 1, 8, 8))
    block = ResidualBlock(8, 8, 16, 0.0)       # its second conv starts at zero: (x + 0) / sqrt(2)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x, torch.randn(2, 16)), x / math.sqrt(2))
    attention = Attention(8)
    torch.testing.assert_close(attention(x), x / math.sqrt(2))


@pytest.mark.parametrize("shape, depth, blocks", [((1, 8, 8), 2, 1), ((1, 28, 28), 3, 2), ((3, 32, 32), 3, 1)])
def test_shapes_and_rows_are_independent(shape, depth, blocks):
    """Output of the data's shape; row b depends on row b only (the likelihood's batched trace needs it)."""
    net = _randomise(UNet(shape[0], shape[1], ModelConfig(width=8, depth=depth, embedding=8, blocks=blocks)))
    x = torch.randn((3,) + shape, requires_grad=True)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out[0].sum(), x)
    assert grad[0].abs().sum() > 0 and torch.equal(grad[1:], torch.zeros_like(grad[1:]))


def test_channels_last_and_bf16_options():
    config = ModelConfig(width=8, depth=2, embedding=8)
    plain = _randomise(UNet(3, 16, config), seed=1)
    x, tau = torch.randn(2, 3, 16, 16), torch.rand(2)
    reference = plain(x, tau)
    nhwc = UNet(3, 16, ModelConfig(width=8, depth=2, embedding=8, channels_last=True))
    nhwc.load_state_dict(plain.state_dict())
    torch.testing.assert_close(nhwc(x, tau), reference, rtol=1e-4, atol=1e-5)
    half = UNet(3, 16, ModelConfig(width=8, depth=2, embedding=8, bf16=True))
    half.load_state_dict(plain.state_dict())
    out = half(x, tau)
    # bfloat16 keeps 8 significant bits (relative rounding 2^-8 = 0.4 %) per operation; a dozen layers deep the
    # output stays within a few percent of the float32 one, and is returned in the input's dtype
    assert out.dtype == torch.float32
    assert (out - reference).norm() / reference.norm() < 0.1


def test_compile_option_is_not_copied_or_saved():
    net = UNet(1, 8, ModelConfig(width=8, depth=2, embedding=8, compile=True))
    net.__dict__["_compiled"] = object()          # as after a first call
    assert "_compiled" not in copy.deepcopy(net).__dict__
    assert not any("compiled" in key for key in net.state_dict())


@pytest.mark.slow
def test_compiled_forward_matches():
    pytest.importorskip("torch._inductor")
    config = ModelConfig(width=8, depth=2, embedding=8)
    plain = _randomise(UNet(1, 8, config), seed=2)
    compiled = UNet(1, 8, ModelConfig(width=8, depth=2, embedding=8, compile=True))
    compiled.load_state_dict(plain.state_dict())
    x, tau = torch.randn(2, 1, 8, 8), torch.rand(2)
    torch.testing.assert_close(compiled(x, tau), plain(x, tau), rtol=1e-4, atol=1e-5)


def test_default_sizes_by_data():
    assert (model_size(ModelConfig(), (2,)).width, model_size(ModelConfig(), (2,)).depth) == MLP_SIZE
    digits, patches = model_size(ModelConfig(), (1, 8, 8)), model_size(ModelConfig(), (3, 32, 32))
    assert (digits.kind, digits.width, digits.depth) == ("unet", 32, 2)
    assert (patches.kind, patches.width, patches.depth) == ("unet", 16, 3)
    assert model_size(ModelConfig(width=48), (1, 8, 8)).width == 48
    from sdelang import load
    sde = load("examples/vp.sde")
    # the digits default was 9.6 M parameters; now well under a million (a 3 MB checkpoint)
    assert sum(p.numel() for p in build_model(sde, (1, 8, 8), ModelConfig()).parameters()) < 1_000_000
