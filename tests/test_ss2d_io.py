"""The fused kernels around SS2D's bidirectional scan (common.ops.ss2d_io) against their PyTorch references.

Without a GPU the Triton kernels run under the CPU interpreter at tiny shapes (odd sizes, so that
every tile has masked edges). The kernels compute in float32, so float64 inputs are compared at
float32 precision.
"""

from __future__ import annotations

import pytest
import torch

from common.networks.blocks.ss2d import SS2D
from common.ops import ss2d_io
from common.ops.ss2d_io import conv_cross, conv_cross_ref, fused_io_available, merge_norm, merge_norm_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture
def kernels(monkeypatch):
    pytest.importorskip("triton")
    from common.ops import ss2d_io_triton as kt

    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = kt if CUDA or kt.INTERPRETED else kt._twin()
    yield mod
    mod.TILE_OVERRIDE.clear()


def _xz(b, h, w, d, dtype=torch.float32):
    xz = torch.randn(b, h, w, 2 * d, device=DEVICE, dtype=dtype)
    return xz[..., :d], xz[..., d:]  # the chunk views of in_proj's output: position strides 2 d


@pytest.mark.parametrize("shape,ks,tiles", [((2, 5, 7, 12), 3, None), ((1, 9, 4, 40), 5, (4, 4, 16, 1)),
                                            ((1, 3, 11, 8), 1, (2, 8, 8, 1))])
def test_conv_cross_matches_the_unfused_ops(kernels, shape, ks, tiles):
    torch.manual_seed(0)
    b, h, w, d = shape
    x, _ = _xz(b, h, w, d)
    weight = torch.randn(d, 1, ks, ks, device=DEVICE)
    bias = torch.randn(d, device=DEVICE)
    if tiles:
        kernels.TILE_OVERRIDE["conv"] = tiles
    got = kernels.conv_cross_triton(x, weight, bias)
    ref = conv_cross_ref(x, weight, bias)
    assert got.shape == (b, 2, d, h * w) and got.dtype == x.dtype
    torch.testing.assert_close(got, ref, **TOL)
    # the column-major sequence is the rows view transposed
    torch.testing.assert_close(got[:, 1].view(b, d, w, h), got[:, 0].view(b, d, h, w).transpose(2, 3))
    torch.testing.assert_close(kernels.conv_cross_triton(x, weight, None), conv_cross_ref(x, weight, None), **TOL)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("gate", ["silu", "plain", None])
@pytest.mark.parametrize("affine", [True, False])
def test_merge_norm_matches_the_unfused_ops(kernels, normalize, gate, affine):
    torch.manual_seed(1)
    b, h, w, d = 2, 5, 7, 40  # 40 channels: three chunks of 16, the last one partial
    ys = torch.randn(b, 4, d, h * w, device=DEVICE) * 3 + 2  # a mean far from 0: the statistics' accuracy
    _, z = _xz(b, h, w, d)
    z = z if gate else None
    weight = torch.randn(d, device=DEVICE) if affine else None
    bias = torch.randn(d, device=DEVICE) if affine else None
    got = kernels.merge_norm_triton(ys, h, w, z, weight, bias, 1e-5, normalize, gate == "silu", torch.float32)
    ref = merge_norm_ref(ys, h, w, z, weight, bias, 1e-5, normalize, gate == "silu")
    assert got.shape == (b, h, w, d) and got.is_contiguous()
    torch.testing.assert_close(got, ref, **TOL)


def test_merge_norm_small_tiles_and_bf16(kernels):
    torch.manual_seed(2)
    b, h, w, d = 1, 6, 3, 24
    ys = torch.randn(b, 4, d, h * w, device=DEVICE)
    _, z = _xz(b, h, w, d)
    weight, bias = torch.rand(d, device=DEVICE) + 0.5, torch.randn(d, device=DEVICE)
    kernels.TILE_OVERRIDE["merge"] = (4, 2, 8, 1)
    ref = merge_norm_ref(ys, h, w, z, weight, bias)
    torch.testing.assert_close(kernels.merge_norm_triton(ys, h, w, z, weight, bias, 1e-5, True, True, torch.float32),
                               ref, **TOL)
    # bf16 in and out: float32 inside, rounded once
    got = kernels.merge_norm_triton(ys.bfloat16(), h, w, z.bfloat16(), weight, bias, 1e-5, True, True, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    ref16 = merge_norm_ref(ys.bfloat16().float(), h, w, z.bfloat16().float(), weight, bias)
    torch.testing.assert_close(got.float(), ref16, rtol=1e-2, atol=1e-2)


def test_dispatch_keeps_autograd_and_checks_shapes(kernels):
    torch.manual_seed(3)
    b, h, w, d = 1, 3, 4, 8
    x, z = _xz(b, h, w, d)
    weight = torch.randn(d, 1, 3, 3, device=DEVICE, requires_grad=True)
    assert fused_io_available(DEVICE)
    kernels.TILE_OVERRIDE["merge"] = (4, 4, 16, 1)  # the fused merge also at this tiny map
    out = conv_cross(x, weight)  # a gradient is wanted: the reference runs, differentiable
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    ys = torch.randn(b, 4, d, h * w, device=DEVICE, requires_grad=True)
    merge_norm(ys, h, w, z).square().sum().backward()
    assert ys.grad is not None
    with torch.no_grad():  # the fused kernels
        torch.testing.assert_close(conv_cross(x, weight), conv_cross_ref(x, weight), **TOL)
        torch.testing.assert_close(merge_norm(ys, h, w, z), merge_norm_ref(ys, h, w, z), **TOL)
    with pytest.raises(ValueError, match="ys must be"):
        merge_norm(ys[:, :2], h, w)
    with pytest.raises(ValueError, match="z must be"):
        merge_norm(ys, h, w, z[:, :, :2])
    with pytest.raises(ValueError, match="depth-wise"):
        conv_cross(x, torch.randn(d, 1, 2, 2, device=DEVICE))


def test_ss2d_fused_inference_path_matches_the_unfused_one(kernels):
    torch.manual_seed(4)
    kernels.TILE_OVERRIDE["merge"] = (4, 4, 16, 1)  # the fused merge also at this tiny map
    m = SS2D(8, d_state=8, scan_backend="triton").to(DEVICE).eval()
    with torch.no_grad():
        m.out_norm.weight.uniform_(0.5, 1.5)
        m.out_norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 7, 8, device=DEVICE)
    ref = m(x)  # parameters want gradients: the unfused ops
    with torch.no_grad():
        assert m._takes_fused_io(m.in_proj(x))
        got = m(x)
        m.fused_io = False
        assert not m._takes_fused_io(m.in_proj(x))
        unfused = m(x)
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(unfused, ref, **TOL)


def test_merge_runs_unfused_where_its_programs_would_be_too_few(kernels, monkeypatch):
    assert kernels.pick_tiles("merge", 1, 8, 8, 1536) is None  # 4 programs of 4 x 4 positions
    assert kernels.pick_tiles("merge", 24, 8, 8, 1536) == (4, 4, 128, 8)
    assert kernels.pick_tiles("merge", 1, 64, 64, 192) == (4, 4, 64, 4)
    assert kernels.pick_tiles("merge", 10, 112, 112, 192) == (8, 8, 64, 4)
    from common.ops import ss2d_io_triton

    def refuse(*args):
        raise AssertionError("the fused merge ran")

    monkeypatch.setattr(ss2d_io_triton, "merge_norm_triton", refuse)
    ys = torch.randn(1, 4, 8, 12, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(merge_norm(ys, 3, 4), merge_norm_ref(ys, 3, 4))


def test_fused_io_needs_triton_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ss2d_io._AVAILABLE.clear()
    assert not fused_io_available("cpu")
    m = SS2D(8, d_state=8, scan_backend="torch").eval()
    with torch.no_grad():
        assert not m._takes_fused_io(torch.zeros(1, 2, 2, 16))
    ss2d_io._AVAILABLE.clear()


@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 96), (2, 1, 1, 1000)])
def test_layer_norm_cast_matches_the_float32_norm_and_cast(kernels, shape):
    torch.manual_seed(5)
    x = torch.randn(*shape, device=DEVICE) * 2 + 1
    d = shape[-1]
    weight, bias = torch.rand(d, device=DEVICE) + 0.5, torch.randn(d, device=DEVICE)
    for w, b in ((weight, bias), (None, None)):
        got = kernels.layer_norm_triton(x, w, b, 1e-6, torch.float32)
        torch.testing.assert_close(got, torch.nn.functional.layer_norm(x, (d,), w, b, 1e-6), **TOL)
    got = kernels.layer_norm_triton(x, weight, bias, 1e-5, torch.bfloat16)
    ref = ss2d_io.layer_norm_cast_ref(x, weight, bias, 1e-5, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    torch.testing.assert_close(got.float(), ref.float(), rtol=8e-3, atol=8e-3)
    if CUDA:  # the same float32 values rounded once: equal but for the odd one on a rounding boundary
        assert (got == ref).float().mean() > 0.99
    else:  # Triton's interpreter casts to bfloat16 by truncation, the compiled kernels round to nearest
        f32 = kernels.layer_norm_triton(x, weight, bias, 1e-5, torch.float32)
        assert torch.equal(got, (f32.view(torch.int32) & -65536).view(torch.float32).bfloat16())


def test_vss_block_norm_reaches_in_proj_in_the_autocast_dtype(kernels, monkeypatch):
    from common.networks.blocks import VSSBlock, layers

    torch.manual_seed(6)
    block = VSSBlock(16, ssm_d_state=8, scan_backend="torch").to(DEVICE).eval()
    x = torch.randn(2, 5, 7, 16, device=DEVICE)
    calls = []
    real = ss2d_io.layer_norm_cast
    monkeypatch.setattr(layers, "layer_norm_cast", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref = block(x)  # parameters want gradients: nn.LayerNorm in float32, in_proj casts
        assert not calls
        with torch.no_grad():
            got = block(x)
    assert calls == [x.shape]
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():  # no autocast: the module itself
        torch.testing.assert_close(layers.norm_before_linear(block.norm, x), block.norm(x))
    assert len(calls) == 1
