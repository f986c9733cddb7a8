"""Regional torch.compile of the networks' blocks (common.networks.compile_blocks) and the
compile-friendly DropPath.

The network-level checks trace with the ``aot_eager`` backend (Dynamo and AOTAutograd as in training,
without generating kernels: seconds on CPU); one small VSS block runs through Inductor itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from common.networks import compile_blocks
from common.networks.blocks import DropPath, VSSBlock
from common.networks.compile import CompilableSequential
from common.networks.msvmunet import LKPE, MSVMUNet


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_drop_path_distribution_and_scaling():
    torch.manual_seed(0)
    layer = DropPath(0.3).train()
    x = torch.ones(20000, 2, 3)
    y = layer(x)
    kept = y[:, 0, 0] != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))
    assert torch.all((y == 0).all(dim=(1, 2)) | (y != 0).all(dim=(1, 2)))  # one decision per sample
    assert layer.eval()(x) is x
    assert DropPath(0.0).train()(x) is x
    with pytest.raises(ValueError):
        DropPath(1.5)


def test_drop_path_probability_is_not_specialised():
    """Blocks of one shape with different stochastic-depth probabilities share one compiled graph."""
    counter = CompileCounter()
    blocks = [VSSBlock(8, drop_path=p, channel_first=True, ssm_d_state=1, ssm_ratio=1.0, mlp_ratio=2.0,
                       scan_backend="torch").train() for p in (0.1, 0.25, 0.4)]
    for b in blocks:
        compile_blocks(b, backend=counter)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    blocks[0](x).sum().backward()
    first = counter.frame_count
    assert first > 0
    for b in blocks[1:]:
        b(x).sum().backward()
    assert counter.frame_count == first


def test_compile_blocks_marks_outermost_compilable_blocks():
    model = MSVMUNet(1, 4, scan_backend="torch")
    assert compile_blocks(model, enabled=False) is model
    assert all(getattr(m, "compile_mode", None) is None for m in model.modules())
    compile_blocks(model)
    vss = [m for m in model.modules() if isinstance(m, VSSBlock)]
    lkpe = [m for m in model.modules() if isinstance(m, LKPE)]
    seq = [m for m in model.modules() if isinstance(m, CompilableSequential)]
    assert len(vss) == 20 and len(lkpe) == 4 and len(seq) == 5
    assert all(m.compile_mode == "default" for m in vss + lkpe + seq)
    assert torch._dynamo.config.recompile_limit >= 64
    from common.networks.blocks import ss2d as ss2d_module

    for fn in (ss2d_module._selective_scan, ss2d_module._cross_selective_scan,
               ss2d_module._bidirectional_selective_scan, ss2d_module.SS2D._scan_path):
        assert getattr(fn, "_torchdynamo_disable", False), fn  # the scans stay outside the graphs
    with pytest.raises(ValueError, match="mode"):
        compile_blocks(model, mode="reduce-overhead")
    with pytest.raises(ValueError, match="no compilable blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
    keys = set(MSVMUNet(1, 4, scan_backend="torch").state_dict())
    assert set(model.state_dict()) == keys  # same checkpoints


def test_compiled_training_matches_eager_and_inference_stays_eager():
    """MSVM-UNet traced block by block (drop path on, BatchNorm in the LKPEs) gives eager's loss,
    gradients and BatchNorm statistics; eval and no_grad calls do not compile."""
    torch.manual_seed(0)
    model = MSVMUNet(1, 4, scan_backend="torch")
    ref = copy.deepcopy(model)
    counter = CompileCounter()
    compile_blocks(model, backend=counter)
    x = torch.randn(2, 1, 64, 64)
    out = []
    for net in (model, ref):
        net.train()
        torch.manual_seed(1)
        out.append(net(x))
        out[-1].square().mean().backward()
    assert counter.frame_count > 0
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)
    g, g_ref = _grads(model), _grads(ref)
    assert g.keys() == g_ref.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=name)  # BatchNorm running statistics updated the same
    frames = counter.frame_count
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    model.train()
    with torch.no_grad():
        model(x)
    assert counter.frame_count == frames


def test_inductor_vss_block_matches_eager():
    """One small channel-first VSS block (MSVM-UNet's kind) through Inductor: same output and gradients."""
    torch.manual_seed(0)
    block = VSSBlock(8, channel_first=True, ssm_d_state=1, ssm_ratio=1.0, ssm_conv_bias=False, ssm_with_z=False,
                     mlp_ratio=2.0, scan_backend="torch").train()
    ref = copy.deepcopy(block)
    compile_blocks(block)
    x = torch.randn(2, 8, 6, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = block(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    (ya * torch.arange(ya.numel()).view_as(ya).sin()).sum().backward()
    (yb * torch.arange(yb.numel()).view_as(yb).sin()).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_failing_compiler_falls_back_to_eager(caplog):
    """A backend that cannot compile (no toolchain, unsupported GPU) leaves training eager, with a warning."""
    from common.networks import compile as compile_module

    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler found")

    torch.manual_seed(0)
    block = VSSBlock(8, channel_first=True, ssm_d_state=1, ssm_ratio=1.0, mlp_ratio=2.0, scan_backend="torch").train()
    ref = copy.deepcopy(block)
    compile_blocks(block, backend=broken)
    x = torch.randn(2, 8, 4, 4)
    try:
        with caplog.at_level("WARNING", logger="common.networks.compile"):
            torch.testing.assert_close(block(x), ref(x))
            torch.testing.assert_close(block(x), ref(x))
        assert sum("no C compiler found" in r.getMessage() for r in caplog.records) == 1
    finally:
        compile_module._FAILED.clear()
