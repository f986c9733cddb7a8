"""SS2D, VSS block and the shared patch layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.networks.blocks import (
    SS2D,
    LayerNorm2d,
    Linear2d,
    PatchEmbed2D,
    PatchExpand2D,
    PatchMerging2D,
    VSSBlock,
    cross_merge,
    cross_scan,
)
from common.ops import available_backends

# VMamba-Tiny (v05_noz, ln2d) block keys and shapes of an original MSVM-UNet checkpoint
# (encoder.layers.0.blocks.0.*, ../shared/specs/msvmunet_original_state_dict.tsv)
VMAMBA_T_BLOCK = {
    "norm.weight": (96,), "norm.bias": (96,),
    "op.x_proj_weight": (4, 8, 96), "op.dt_projs_weight": (4, 96, 6), "op.dt_projs_bias": (4, 96),
    "op.A_logs": (384, 1), "op.Ds": (384,), "op.out_norm.weight": (96,), "op.out_norm.bias": (96,),
    "op.in_proj.weight": (96, 96), "op.conv2d.weight": (96, 1, 3, 3), "op.out_proj.weight": (96, 96),
    "norm2.weight": (96,), "norm2.bias": (96,), "mlp.fc1.weight": (384, 96), "mlp.fc1.bias": (384,),
    "mlp.fc2.weight": (96, 384), "mlp.fc2.bias": (96,),
}


def vmamba_tiny_block(**kw):
    return VSSBlock(96, channel_first=True, ssm_d_state=1, ssm_ratio=1.0, ssm_with_z=False,
                    ssm_conv_bias=False, mlp_ratio=4.0, **kw)


def test_cross_scan_orders_and_adjoint():
    x = torch.arange(2 * 3 * 4, dtype=torch.float64).view(1, 2, 3, 4)
    xs = cross_scan(x)
    assert xs.shape == (1, 4, 2, 12)
    assert torch.equal(xs[0, 0, 0], x[0, 0].flatten())
    assert torch.equal(xs[0, 1, 0], x[0, 0].t().flatten())
    assert torch.equal(xs[0, 2], xs[0, 0].flip(-1)) and torch.equal(xs[0, 3], xs[0, 1].flip(-1))
    torch.testing.assert_close(cross_merge(xs, 3, 4), 4 * x)
    ys = torch.randn(1, 4, 2, 12, dtype=torch.float64)
    # cross_merge is the adjoint (transpose) of cross_scan
    torch.testing.assert_close((cross_scan(x) * ys).sum(), (x * cross_merge(ys, 3, 4)).sum())


@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("d_conv", [1, 3])
def test_ss2d_shapes_and_gradients(channel_first, with_z, d_conv):
    torch.manual_seed(0)
    m = SS2D(16, d_state=4, ssm_ratio=2.0, d_conv=d_conv, with_z=with_z, channel_first=channel_first)
    x = torch.randn(2, 16, 5, 7) if channel_first else torch.randn(2, 5, 7, 16)
    x.requires_grad_(True)
    y = m(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert (m.conv2d is None) == (d_conv < 2)
    assert m.in_proj.weight.shape[0] == (64 if with_z else 32)


def test_ss2d_channel_first_equals_channels_last():
    torch.manual_seed(0)
    last = SS2D(16, d_state=4, channel_first=False)
    first = SS2D(16, d_state=4, channel_first=True)
    first.load_state_dict(last.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 6, 5, 16)
    torch.testing.assert_close(first(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), last(x), rtol=1e-5, atol=1e-5)


def test_ss2d_v0_initialisation():
    torch.manual_seed(0)
    m = SS2D(32, d_state=16, ssm_ratio=2.0, dt_min=0.001, dt_max=0.1)
    assert m.dt_rank == math.ceil(32 / 16)
    torch.testing.assert_close(m.A_logs[5], torch.log(torch.arange(1, 17.0)))
    assert torch.all(m.Ds == 1)
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    std = m.dt_rank**-0.5
    assert m.dt_projs_weight.abs().max() <= std
    assert getattr(m.A_logs, "_no_weight_decay", False) and getattr(m.Ds, "_no_weight_decay", False)


def test_ss2d_same_output_and_gradients_on_every_cpu_backend():
    torch.manual_seed(0)
    m = SS2D(8, d_state=16, ssm_ratio=2.0)  # d_inner 16: blocks of 8 channels in the cpu kernel
    x = torch.randn(2, 6, 7, 8)
    outs = {}
    backends = [b for b in available_backends("cpu") if b != "ref"]
    assert {"torch", "cpu"} <= set(backends)
    for backend in (*backends, "ref"):
        m.scan_backend = backend
        m.zero_grad()
        y = m(x)
        y.square().sum().backward()
        outs[backend] = (y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    for backend in backends:
        torch.testing.assert_close(outs[backend][0], outs["ref"][0], rtol=1e-5, atol=1e-5)
        for name, g in outs["ref"][1].items():
            torch.testing.assert_close(outs[backend][1][name], g, rtol=1e-4, atol=1e-4, msg=f"{backend} {name}")


def test_ss2d_is_deterministic():
    def build():
        torch.manual_seed(123)
        return SS2D(8, d_state=4)

    x = torch.randn(1, 6, 6, 8)
    a, b = build(), build()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    torch.testing.assert_close(a(x), a(x), rtol=0, atol=0)


def test_ss2d_rejects_bad_options():
    with pytest.raises(ValueError, match="dt_init"):
        SS2D(8, dt_init="uniform")
    with pytest.raises(ValueError, match="initialize"):
        SS2D(8, initialize="v9")


def test_vss_block_vmamba_tiny_keys_and_shapes():
    block = vmamba_tiny_block()
    got = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert got == VMAMBA_T_BLOCK


@pytest.mark.parametrize("mlp_ratio", [0.0, 4.0])
def test_vss_block_residual_and_drop_path(mlp_ratio):
    torch.manual_seed(0)
    block = VSSBlock(16, drop_path=0.5, ssm_d_state=4, mlp_ratio=mlp_ratio)
    x = torch.randn(3, 4, 4, 16)
    block.eval()
    y = block(x)
    assert y.shape == x.shape
    # in eval mode drop path is off: the block is x + op(norm(x)) (+ mlp branch)
    want = x + block.op(block.norm(x))
    if mlp_ratio:
        want = want + block.mlp(block.norm2(want))
    torch.testing.assert_close(y, want)
    block.train()
    torch.manual_seed(1)
    outs = [block(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])  # stochastic depth acts in training


def test_vss_block_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = vmamba_tiny_block().train()
    ckpt = vmamba_tiny_block(use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 96, 6, 6)
    for m in (plain, ckpt):
        m(x).sum().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=n)


def test_linear2d_and_layernorm2d_match_channels_last_versions():
    torch.manual_seed(0)
    lin2d, lin = Linear2d(6, 5), nn.Linear(6, 5)
    lin.load_state_dict(lin2d.state_dict())
    x = torch.randn(2, 6, 3, 4)
    torch.testing.assert_close(lin2d(x), lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    conv_sd = {"weight": lin.weight[:, :, None, None].clone(), "bias": lin.bias.clone()}
    lin2d.load_state_dict(conv_sd)  # a 1x1 Conv2d checkpoint loads too
    torch.testing.assert_close(lin2d.weight, lin.weight)
    ln2d, ln = LayerNorm2d(6), nn.LayerNorm(6)
    torch.testing.assert_close(ln2d(x), ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_patch_embed_merge_expand():
    x = torch.randn(2, 3, 32, 32)
    emb = PatchEmbed2D(4, 3, 24)(x)
    assert emb.shape == (2, 8, 8, 24)
    merge = PatchMerging2D(24)
    assert merge(emb).shape == (2, 4, 4, 48)
    assert merge(torch.randn(1, 5, 7, 24)).shape == (1, 3, 4, 48)  # odd sizes are padded
    # Swin's neighbour order: (0,0), (1,0), (0,1), (1,1)
    m = PatchMerging2D(1)
    with torch.no_grad():
        m.norm.weight.fill_(1), m.norm.bias.zero_()
        m.reduction.weight.copy_(torch.eye(4)[:2])
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 2, 1)
    normed = F.layer_norm(torch.tensor([1.0, 3.0, 2.0, 4.0]), (4,))
    torch.testing.assert_close(m(t).flatten(), normed[:2])
    up = PatchExpand2D(48, scale=2)
    assert up(torch.randn(2, 4, 4, 48)).shape == (2, 8, 8, 24)
    final = PatchExpand2D(24, scale=4, out_dim=24)
    assert final(emb).shape == (2, 32, 32, 24)
    # pixel-shuffle order: output pixel (2i+p1, 2j+p2) takes channels [(p1*2+p2)*c, +c) of the linear
    e = PatchExpand2D(4, scale=2, out_dim=1)
    e.norm = nn.Identity()
    with torch.no_grad():
        e.expand.weight.copy_(torch.eye(4))
    assert e(torch.arange(4.0).view(1, 1, 1, 4)).view(2, 2).tolist() == [[0, 1], [2, 3]]


def test_layer_norms_in_input_dtype_under_autocast():
    from common.networks.blocks.layers import InputDtypeLayerNorm, LayerNorm2d, layer_norms_in_input_dtype
    from common.networks.graphs import graphed_for_inference

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Sequential(nn.LayerNorm(16, bias=False)))
    net.add_module("ln2d", LayerNorm2d(16))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    keys = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 8)
    with torch.no_grad():  # float32 throughout
        plain = net[:3](x)
    out = graphed_for_inference(net, enabled=True, input_dtype_norms=True)  # on CPU: not graphed
    assert out is net and type(net[1]) is InputDtypeLayerNorm and type(net[2][0]) is InputDtypeLayerNorm
    assert type(net.ln2d) is LayerNorm2d  # subclasses are kept
    assert net[1].weight is not None and net[2][0].bias is None
    assert set(net.state_dict()) == set(keys)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, keys[k], rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = net[:3](x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), plain, rtol=2e-2, atol=2e-2)  # bf16 rounding
    torch.testing.assert_close(net[:3](x), net[2][0](net[1](net[0](x))))
    with torch.no_grad():  # outside autocast it is nn.LayerNorm
        ref = nn.functional.layer_norm(net[0](x), (16,), net[1].weight, net[1].bias)
        torch.testing.assert_close(net[1](net[0](x)), ref, rtol=0, atol=0)
    assert layer_norms_in_input_dtype(nn.LayerNorm(4), enabled=False).__class__ is nn.LayerNorm
