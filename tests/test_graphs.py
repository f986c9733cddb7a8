"""CUDA-graph inference wrapper: eager pass-through off the GPU, same outputs and checkpoints on it."""

from __future__ import annotations

import pytest
import torch

from common.networks.graphs import CUDAGraphInference, autocast_cast_parameters, graphed_for_inference
from common.networks.mambahunet import MambaHUNet

CUDA = torch.cuda.is_available()


def small_net() -> MambaHUNet:
    torch.manual_seed(0)
    return MambaHUNet(1, 2, embed_dim=16, depths=(1, 1), drop_path_rate=0.0, dropout=0.0)


def test_cpu_and_training_run_eagerly_and_checkpoints_keep_their_names():
    net = small_net()
    wrapped = CUDAGraphInference(net.eval())
    assert not wrapped.training  # follows its module
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), net(x), rtol=0, atol=0)
    assert list(wrapped.state_dict()) == list(net.state_dict())  # no "module." prefix
    other = small_net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    wrapped.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), other.eval()(x), rtol=0, atol=0)
    wrapped.train()
    assert wrapped(x).requires_grad and not wrapped._graphs


def test_parameters_cast_once_give_the_autocast_forward_and_follow_in_place_updates():
    net = small_net().eval()
    cast = autocast_cast_parameters(net, torch.bfloat16)
    params = dict(net.named_parameters())
    assert cast and all(params[n] is c.param and c.copy.dtype == torch.bfloat16 for n, c in cast.items())
    assert not [n for n in cast if "norm" in n]  # normalisation parameters stay float32 (autocast keeps them)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = net(x)
        got = torch.func.functional_call(net, {n: c.copy for n, c in cast.items()}, (x,), strict=False)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the same rounding as autocast's own casts
    name, c = next(iter(cast.items()))
    with torch.no_grad():
        params[name].mul_(2)
    c.sync()
    torch.testing.assert_close(c.copy, params[name].detach().to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_replays_the_eager_forward(amp):
    net = small_net().cuda().eval()
    wrapped = CUDAGraphInference(net, max_graphs=2)
    xs = [torch.randn(b, 1, 32, 32, device="cuda") for b in (1, 3, 1, 2)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        for x in xs:
            torch.testing.assert_close(wrapped(x).float(), net(x).float(), rtol=1e-3, atol=1e-3)
    assert len(wrapped._graphs) == 2  # shapes 1, 3, 2 seen; least recently used dropped
    # weights loaded in place are what the graph reads
    with torch.no_grad():
        state = {k: v + 0.05 if v.is_floating_point() else v for k, v in net.state_dict().items()}
        wrapped.load_state_dict(state)
        x = xs[0]
        torch.testing.assert_close(wrapped(x).float(), net(x).float(), rtol=1e-3, atol=1e-3)


def test_graphed_for_inference_leaves_cpu_modules_alone_and_checks_buckets():
    net = small_net()
    assert graphed_for_inference(net) is net  # CPU parameters: nothing to graph
    with pytest.raises(ValueError, match="batch_buckets"):
        CUDAGraphInference(net, batch_buckets=[0, 4])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_batch_buckets_pad_and_share_graphs():
    net = small_net().cuda().eval()
    wrapped = graphed_for_inference(net, max_batch=6)
    assert wrapped.batch_buckets == [1, 2, 4, 6]
    with torch.no_grad():
        for b in (6, 5, 3, 4, 1, 6, 7):
            x = torch.randn(b, 1, 32, 32, device="cuda")
            out = wrapped(x)
            assert out.shape[0] == b
            torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-4)
    assert sorted(k[0][0] for k in wrapped._graphs) == [1, 4, 6, 7]  # 5 -> 6, 3 -> 4, 7 gets its own


def test_bundle_inference_config_turns_on_input_dtype_norms():
    import os

    from monai.bundle import ConfigParser

    from common.networks.blocks.layers import InputDtypeLayerNorm

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mambahunet_ms")
    norms = {}
    for flag in (False, True):
        parser = ConfigParser()
        parser.read_config(os.path.join(root, "configs", "inference.json"))
        parser.update({"bundle_root": root, "device": "$torch.device('cpu')", "amp_input_dtype_norms": flag})
        net = parser.get_parsed_content("network")
        norms[flag] = [type(m) for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms[False] and InputDtypeLayerNorm not in norms[False]
    assert len(norms[True]) == len(norms[False]) and InputDtypeLayerNorm in norms[True]


def _randomise_norms(net):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_fold_batch_norms_keeps_the_outputs_and_handler_runs_after_loading():
    from ignite.engine import Engine

    from common.handlers import FoldBatchNorms
    from common.networks.blocks.layers import fuse_conv_bn_for_inference
    from common.networks.resnet import ResNetTrunk

    def norms(m):
        return sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())

    trunk = ResNetTrunk((1, 1), in_channels=1, num_stages=2)
    _randomise_norms(trunk)
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match="training mode"):
        fuse_conv_bn_for_inference(trunk)
    with torch.no_grad():
        want = trunk.eval()(x)
        before = norms(trunk)
        fuse_conv_bn_for_inference(trunk)
        got = trunk(x)
    assert before == 9 and norms(trunk) == 0 and trunk.folded_conv_bn == 9  # stem, bottlenecks, downsamples
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

    net = small_net()  # Mamba-HUNet: transposed convolutions and 3x3 convolutions with their norms
    _randomise_norms(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net_norms = norms(net)
    wrapped = graphed_for_inference(net, enabled=True)
    with torch.no_grad():
        want = net.eval()(torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    net.train()
    engine = Engine(lambda e, b: None)
    net.load_state_dict(state)  # what the checkpoint loader does first
    FoldBatchNorms(wrapped, enabled=False).attach(engine)
    FoldBatchNorms(wrapped).attach(engine)
    engine.run([0], max_epochs=1)
    assert not net.training and net.folded_conv_bn == net_norms > 0 and norms(net) == 0
    with torch.no_grad():
        got = wrapped(torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))])
def test_fold_handler_fuses_conv_relu_and_stores_channels_last_on_cuda(device):
    """MSSMamba's inference config: FoldBatchNorms(conv_relu=True, channels_last=True) folds, fuses the 3x3
    convolution + ReLU pairs and, on CUDA only, stores the weights channels-last; outputs unchanged."""
    from ignite.engine import Engine

    from common.handlers import FoldBatchNorms
    from common.networks.resnet import ResNetTrunk

    trunk = ResNetTrunk((1, 1), in_channels=1, num_stages=2)
    _randomise_norms(trunk)
    trunk = trunk.to(device)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        want = trunk.eval()(x)
    trunk.train()
    engine = Engine(lambda e, b: None)
    FoldBatchNorms(trunk, conv_relu=True, channels_last=True).attach(engine)
    engine.run([0], max_epochs=1)
    assert trunk.folded_conv_bn == 9 and trunk.fused_conv_relu > 0
    convs = [m for m in trunk.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1 and m.in_channels > 1]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) == (device == "cuda") for c in convs)
    with torch.no_grad():
        got = trunk(x)
    tol = dict(rtol=1e-4, atol=1e-4) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)  # cuDNN: TF32
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))])
def test_conv_relu_fusion_keeps_outputs_and_keys(device):
    """After folding, each 3x3 convolution a ReLU follows (Sequentials, the bottlenecks' conv2) runs as one
    Conv2dReLU (one cuDNN call on CUDA): same outputs and state-dict keys; 1x1 convolutions and pairs with an
    unfolded norm between stay as they were."""
    from common.networks.blocks.layers import Conv2dReLU, fuse_conv_bn_for_inference, fuse_conv_relu_for_inference
    from common.networks.resnet import ResNetTrunk

    torch.manual_seed(0)
    trunk = ResNetTrunk((1, 2), in_channels=1, num_stages=2)
    head = torch.nn.Sequential(torch.nn.Conv2d(512, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1),
                               torch.nn.ReLU(inplace=True))
    net = torch.nn.Sequential(trunk, torch.nn.Identity()).to(device)
    _randomise_norms(net)
    _randomise_norms(head)
    head.to(device)
    x = torch.randn(2, 1, 32, 32, device=device)
    with pytest.raises(ValueError, match="training mode"):
        fuse_conv_relu_for_inference(head)
    trunk.eval(), head.eval()
    with torch.no_grad():
        want = head(trunk(x)[-1])
        fuse_conv_relu_for_inference(head)  # the norm is not folded yet: only the last 3x3 pair fuses
        assert head.fused_conv_relu == 1 and isinstance(head[5], Conv2dReLU) and type(head[6]) is torch.nn.Identity
        fuse_conv_bn_for_inference(trunk), fuse_conv_bn_for_inference(head)
        keys = list(trunk.state_dict()) + list(head.state_dict())
        fuse_conv_relu_for_inference(trunk), fuse_conv_relu_for_inference(head)
        got = head(trunk(x)[-1])
    # 3 bottlenecks' conv2 (the stem is 7x7 but the max-pool comes between), the head's first conv; not its 1x1
    assert trunk.fused_conv_relu == 3 and head.fused_conv_relu == 2
    assert type(head[3]) is torch.nn.Conv2d and type(head[4]) is torch.nn.ReLU
    assert list(trunk.state_dict()) + list(head.state_dict()) == keys
    tol = dict(rtol=1e-4, atol=1e-5) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)  # cuDNN: TF32
    torch.testing.assert_close(got, want, **tol)
    if device == "cuda":
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            torch.testing.assert_close(head(trunk(x)[-1]).float(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))])
def test_folded_network_reloads_unfolded_checkpoints_and_refuses_to_train(tmp_path, device):
    from ignite.engine import Engine

    from common.guards import SafeCheckpointLoader
    from common.networks.blocks.layers import FoldedBatchNorm2d, folded_state_dict, fuse_conv_bn_for_inference

    net = small_net().to(device)
    _randomise_norms(net)
    first = {k: v.clone() for k, v in net.state_dict().items()}
    other = small_net().to(device)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    _randomise_norms(other)
    other.eval()
    second = other.state_dict()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        want = other(x)
    tol = dict(rtol=1e-4, atol=1e-5) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)  # cuDNN: TF32
    wrapped = graphed_for_inference(net.eval(), enabled=True)  # CPU: the module itself; CUDA: the wrapper
    fuse_conv_bn_for_inference(wrapped)
    assert wrapped.folded_conv_bn > 0 and isinstance(wrapped, CUDAGraphInference) == (device == "cuda")
    with torch.no_grad():
        wrapped(x)  # on CUDA: captures a graph, which the reloads below must update
    wrapped.load_state_dict(second)  # an unfolded checkpoint into the folded network, strict
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), want, **tol)
    # the folded network's own state dict loads back into it; the helper leaves it alone
    folded = {k: v.clone() for k, v in net.state_dict().items()}
    assert not any("running_mean" in k for k in folded)
    again = folded_state_dict(net, folded)
    assert list(again) == list(folded) and all(again[k] is folded[k] for k in folded)
    assert folded_state_dict(small_net().to(device), first) is first  # nothing folded: the dict itself
    net.load_state_dict(folded)
    # the same checkpoint through the bundles' loader (key check first), from a file
    torch.save(first, tmp_path / "model.pt")
    with torch.no_grad():
        want_first = small_net().to(device).eval()
        want_first.load_state_dict(first)
        want_first = want_first(x)
    SafeCheckpointLoader(load_path=str(tmp_path / "model.pt"), load_dict={"model": wrapped}, map_location=device)(
        Engine(lambda e, b: None))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), want_first, **tol)
    assert any(isinstance(m, FoldedBatchNorm2d) for m in net.modules())
    net.train()
    with pytest.raises(RuntimeError, match="folded into the convolution"):
        net(x)
