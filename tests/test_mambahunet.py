"""Mamba-HUNet network: sizes, shapes, gradients, scan backends, checkpoints (Mamba-UNet / VMamba v0 / own)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from common.networks.blocks import SS2D
from common.networks.complexity import count_flops, count_parameters
from common.networks.mambahunet import MambaHUNet, checkpoint_filter_fn, load_pretrained, mambahunet

# recorded in mambahunet_ms/docs/network.md
PARAMS = 22_335_842
FLOPS_256 = dict(dense_macs=7_396_589_568, scan=3_306_946_560)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mambahunet().eval()


def tiny(**kwargs) -> MambaHUNet:
    kwargs = {"embed_dim": 16, "depths": (1, 1, 1, 1), **kwargs}
    return MambaHUNet(**kwargs)


def test_parameter_counts(model):
    assert count_parameters(model) == PARAMS
    assert count_parameters(model.encoder) == 13_749_408  # Mamba-UNet's encoder at 1 input channel
    assert count_parameters(model.norm) == 1_536
    assert count_parameters(model.decoder) == 8_584_898
    assert count_parameters(model.decoder.ups) == 4_842_432
    assert count_parameters(mambahunet(num_classes=4)) == PARAMS + 2 * 25  # 1x1 conv 24 -> classes, with bias


def test_forward_shapes(model):
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
        assert model(torch.randn(1, 1, 64, 96)).shape == (1, 2, 64, 96)  # batch 2: gradient test
        y = model(torch.randn(1, 1, 256, 256))  # the paper's slice size
    assert y.shape == (1, 2, 256, 256) and torch.isfinite(y).all()


def test_flops_recorded_in_docs(model):
    # every layer is per pixel or per token (no attention): the count at 256 is 16x the one at 64
    flops = count_flops(model, (1, 1, 64, 64))
    assert 16 * flops["dense_macs"] == FLOPS_256["dense_macs"]
    assert 16 * flops["scan"] == FLOPS_256["scan"]


def test_input_and_argument_errors(model):
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 1, 60, 64))
    with pytest.raises(ValueError, match="1 input channel"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\)"):
        model(torch.randn(1, 64, 64))
    with pytest.raises(ValueError, match="depths_decoder needs 3"):
        MambaHUNet(depths_decoder=(2, 2))
    assert tiny(depths=(1, 1, 1)).size_divisor == 16


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.0).train()  # stochastic depth could drop a whole branch of a tiny batch
    model(torch.randn(2, 1, 64, 64)).logsumexp(1).mean().backward()  # bottleneck 2 x 2: with one token A_logs gets no gradient
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []


def test_torch_scan_backend_equals_reference():
    torch.manual_seed(0)
    fast = tiny(scan_backend="torch").eval()
    ref = tiny(scan_backend="ref").eval()
    ref.load_state_dict(fast.state_dict())
    assert all(m.scan_backend == "ref" for m in ref.modules() if isinstance(m, SS2D))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)


def test_freeze_encoder():
    model = tiny()
    model.freeze_encoder()
    assert not any(p.requires_grad for p in (*model.encoder.parameters(), *model.norm.parameters()))
    assert all(p.requires_grad for p in model.decoder.parameters())
    model.unfreeze_encoder()
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------ foreign checkpoints
# Original names and shapes, from the constructors in Mamba-UNet's code/networks/mamba_sys.py
# (VSSM, VSSLayer, VSSLayer_up, VSSBlock, SS2D, PatchEmbed2D, PatchMerging2D, PatchExpand,
# FinalPatchExpand_X4; d_state 16, expand 2, dt_rank ceil(C / 16)) and the MambaUnet wrapper.


def _vss_block(prefix: str, c: int, n: int = 16) -> dict:
    d, r = 2 * c, math.ceil(c / 16)
    shapes = {"ln_1.weight": (c,), "ln_1.bias": (c,), "self_attention.in_proj.weight": (2 * d, c),
              "self_attention.conv2d.weight": (d, 1, 3, 3), "self_attention.conv2d.bias": (d,),
              "self_attention.x_proj_weight": (4, r + 2 * n, d), "self_attention.dt_projs_weight": (4, d, r),
              "self_attention.dt_projs_bias": (4, d), "self_attention.A_logs": (4 * d, n),
              "self_attention.Ds": (4 * d,), "self_attention.out_norm.weight": (d,),
              "self_attention.out_norm.bias": (d,), "self_attention.out_proj.weight": (c, d)}
    return {prefix + k: torch.randn(s) for k, s in shapes.items()}


def _vmamba_v0_encoder(dims, depths, in_chans: int = 3) -> dict:
    sd = {"patch_embed.proj.weight": torch.randn(dims[0], in_chans, 4, 4), "patch_embed.proj.bias": torch.randn(dims[0]),
          "patch_embed.norm.weight": torch.randn(dims[0]), "patch_embed.norm.bias": torch.randn(dims[0]),
          "norm.weight": torch.randn(dims[-1]), "norm.bias": torch.randn(dims[-1])}
    for i, (c, depth) in enumerate(zip(dims, depths)):
        for j in range(depth):
            sd.update(_vss_block(f"layers.{i}.blocks.{j}.", c))
        if i < len(dims) - 1:
            sd.update({f"layers.{i}.downsample.norm.weight": torch.randn(4 * c),
                       f"layers.{i}.downsample.norm.bias": torch.randn(4 * c),
                       f"layers.{i}.downsample.reduction.weight": torch.randn(2 * c, 4 * c)})
    return sd


def _mamba_unet(dims, depths, num_classes: int) -> dict:
    """A trained Mamba-UNet checkpoint: ``MambaUnet.state_dict()`` (``mamba_unet.`` + VSSM keys)."""
    sd = _vmamba_v0_encoder(dims, depths)
    n = len(dims)
    sd.update({"layers_up.0.expand.weight": torch.randn(2 * dims[-1], dims[-1]),
               "layers_up.0.norm.weight": torch.randn(dims[-1] // 2),
               "layers_up.0.norm.bias": torch.randn(dims[-1] // 2)})
    for i in range(1, n):
        c = dims[n - 1 - i]
        for j in range(depths[n - 1 - i]):
            sd.update(_vss_block(f"layers_up.{i}.blocks.{j}.", c))
        if i < n - 1:
            sd.update({f"layers_up.{i}.upsample.expand.weight": torch.randn(2 * c, c),
                       f"layers_up.{i}.upsample.norm.weight": torch.randn(c // 2),
                       f"layers_up.{i}.upsample.norm.bias": torch.randn(c // 2)})
        sd.update({f"concat_back_dim.{i}.weight": torch.randn(c, 2 * c), f"concat_back_dim.{i}.bias": torch.randn(c)})
    sd.update({"norm_up.weight": torch.randn(dims[0]), "norm_up.bias": torch.randn(dims[0]),
               "up.expand.weight": torch.randn(16 * dims[0], dims[0]), "up.norm.weight": torch.randn(dims[0]),
               "up.norm.bias": torch.randn(dims[0]), "output.weight": torch.randn(num_classes, dims[0], 1, 1)})
    return {"mamba_unet." + k: v for k, v in sd.items()}


def _hunet_parts(key: str) -> bool:
    """Parts of Mamba-HUNet that Mamba-UNet does not have."""
    return bool(re.search(r"\.(transposed|refine)\.|^decoder\.final_", key))


def test_load_trained_mamba_unet_checkpoint(tmp_path):
    torch.manual_seed(1)
    dims, depths = (16, 32, 64, 128), (2, 2, 2, 2)
    original = _mamba_unet(dims, depths, num_classes=4)
    path = tmp_path / "VIM_best_model.pth"
    torch.save(original, path)
    model = tiny(depths=depths)
    report = load_pretrained(model, str(path))
    assert report["source"] == "mamba_unet"
    assert report["missing"] == [] and report["unexpected"] == [] and report["shape_mismatch"] == []
    own = model.state_dict()
    mapped, _ = checkpoint_filter_fn(original, model)
    assert sorted(k for k in own if k not in mapped) == sorted(k for k in own if _hunet_parts(k) or "num_batches" in k)
    o = {k[len("mamba_unet."):]: v for k, v in original.items()}
    pairs = {
        "encoder.layers.1.blocks.0.norm.weight": "layers.1.blocks.0.ln_1.weight",
        "encoder.layers.3.blocks.1.op.A_logs": "layers.3.blocks.1.self_attention.A_logs",
        "encoder.layers.2.downsample.reduction.weight": "layers.2.downsample.reduction.weight",
        "norm.weight": "norm.weight",
        "decoder.ups.0.expand.expand.weight": "layers_up.0.expand.weight",
        "decoder.ups.2.expand.norm.bias": "layers_up.2.upsample.norm.bias",
        "decoder.layers_up.0.blocks.1.op.x_proj_weight": "layers_up.1.blocks.1.self_attention.x_proj_weight",
        "decoder.layers_up.2.blocks.0.op.out_proj.weight": "layers_up.3.blocks.0.self_attention.out_proj.weight",
        "decoder.concat_back_dim.2.bias": "concat_back_dim.3.bias",
        "decoder.norm_up.weight": "norm_up.weight",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(own[ours], o[theirs]), ours
    # the grey patch embedding is the 3-channel one applied to a slice repeated to 3 channels
    x = torch.randn(1, 1, 16, 16)
    w3 = o["patch_embed.proj.weight"]
    torch.testing.assert_close(F.conv2d(x, own["encoder.patch_embed.proj.weight"], stride=4),
                               F.conv2d(x.repeat(1, 3, 1, 1), w3, stride=4), rtol=1e-5, atol=1e-5)


def test_load_vmamba_v0_imagenet_checkpoint(tmp_path):
    torch.manual_seed(2)
    dims = (16, 32, 64, 128)
    sd = _vmamba_v0_encoder(dims, (2, 2, 3, 2))  # ImageNet depths differ (VMamba-T v0: 2, 2, 9, 2)
    sd.update({"head.weight": torch.randn(1000, dims[-1]), "head.bias": torch.randn(1000)})
    path = tmp_path / "vmamba_tiny_e292.pth"
    torch.save({"model": sd, "epoch": 292}, path)
    model = tiny(depths=(2, 2, 2, 2))
    report = load_pretrained(model, str(path))
    assert report["source"] == "vmamba" and report["missing"] == [] and report["shape_mismatch"] == []
    assert report["unexpected"] and all(".layers.2.blocks.2." in k or ".layers_up.0.blocks.2." in k
                                        for k in report["unexpected"])  # the ImageNet-only third block
    own = model.state_dict()
    for i in range(3):  # as Mamba-UNet's load_from: encoder stage i also initialises the decoder stage of its width
        j = 2 - i
        for name in ("norm.weight", "op.in_proj.weight", "op.Ds", "op.dt_projs_bias"):
            theirs = sd[f"layers.{i}.blocks.1.{name.replace('norm.', 'ln_1.').replace('op.', 'self_attention.')}"]
            assert torch.equal(own[f"encoder.layers.{i}.blocks.1.{name}"], theirs)
            assert torch.equal(own[f"decoder.layers_up.{j}.blocks.1.{name}"], theirs)


def test_load_own_checkpoint_and_other_class_count(tmp_path):
    torch.manual_seed(3)
    src = tiny()
    path = tmp_path / "model.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst = tiny()
    report = load_pretrained(dst, str(path))
    assert report["source"] == "mambahunet" and not report["missing"] and not report["unexpected"]
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    four = tmp_path / "four_classes.pt"
    torch.save(tiny(num_classes=4).state_dict(), four)
    with pytest.raises(ValueError, match="another shape"):
        load_pretrained(dst, str(four))
    report = load_pretrained(dst, str(four), strict=False)  # fine-tuning from another class count
    assert report["shape_mismatch"] == ["decoder.final_conv.weight", "decoder.final_conv.bias"]


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    model = tiny()
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_pretrained(model, str(tmp_path / "missing.pth"))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": model.state_dict(), "args": re.compile("x")}, pickled)  # needs code to unpickle
    with pytest.raises(ValueError, match="weights_only=True"):
        load_pretrained(model, str(pickled))
    unet = tmp_path / "unet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 1, 3, 3), "up4.conv.weight": torch.zeros(8, 8, 3, 3)}, unet)
    with pytest.raises(ValueError, match="neither a Mamba-HUNet, a Mamba-UNet nor a VMamba"):
        load_pretrained(model, str(unet))
    msvmunet = tmp_path / "msvmunet.pth"  # another network that also names its parts encoder / decoder
    torch.save({"encoder.layer0.0.weight": torch.zeros(48, 3, 3, 3),
                "decoder.out_layers.0.out.weight": torch.zeros(4, 96, 1, 1)}, msvmunet)
    with pytest.raises(ValueError, match="does not match MambaHUNet"):
        load_pretrained(model, str(msvmunet))
