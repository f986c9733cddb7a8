"""MSSMamba network: sizes against the original code, behaviour of its modules, checkpoints."""

from __future__ import annotations

import re

import pytest
import torch

from common.networks.complexity import count_parameters
from common.networks.mssmamba import (
    HLAEM,
    MSACBlock,
    bilinear_downscale,
    bilinear_resize,
    checkpoint_filter_fn,
    load_pretrained,
    mssmamba,
)


@pytest.fixture(scope="module")
def model224():
    torch.manual_seed(0)
    return mssmamba(1, 9, 224)


def test_parameter_counts_match_the_original_code(model224):
    # counts of the original code's modules that run in its forward pass, computed from its
    # constructors (mssmamba_synapse/docs/original_code_notes.md, section 1.7)
    p = model224.All2Cross.pyramid
    assert count_parameters(p.resnet_layers) == 8_543_296
    assert [count_parameters(b) for b in (p.cs_block1, p.cs_block2, p.cs_block3)] == [706_278, 1_163_430, 4_648_998]
    assert count_parameters(p.vmunet) == 13_206_144
    assert count_parameters(model224.All2Cross.blocks) == 2_592_864
    assert sum(x.numel() for x in model224.All2Cross.pos_embed) == 376_800
    assert count_parameters(model224.hlaem) == 647_304
    decoder = (model224.ConvUp_s, model224.ConvUp_l, model224.conv_pred, model224.segmentation_head)
    assert sum(count_parameters(m) for m in decoder) == 704_553
    assert count_parameters(model224) == 33_588_835


def test_forward_shapes_and_errors():
    torch.manual_seed(0)
    model = mssmamba(1, 9, 64).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 9, 64, 64)
    with pytest.raises(ValueError, match="built for 64 x 64"):
        model(torch.randn(1, 1, 96, 96))
    with pytest.raises(ValueError, match=r"expects \(B, 1, H, W\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        mssmamba(1, 9, 100)
    with pytest.raises(ValueError, match="at least 64"):  # not a RuntimeError from avg_pool2d in forward
        mssmamba(1, 9, 32)


def test_every_part_is_trained():
    torch.manual_seed(0)
    model = mssmamba(1, 4, 64)
    model(torch.randn(2, 1, 64, 64)).logsumexp(1).mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []  # HLAEM included: it is a registered, trained module here


def test_msacb_and_hlaem_behaviour():
    torch.manual_seed(0)
    block = MSACBlock(8, 16).eval()
    assert block(torch.randn(2, 8, 14, 14)).shape == (2, 16, 14, 14)  # 14 -> 7 and 3 and back
    hlaem = HLAEM(32).eval()
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        hlaem.alise2.weight.zero_()
        hlaem.alise2.bias.zero_()
        torch.testing.assert_close(hlaem(x), x)  # the refinement is a residual branch


def test_resizing_shortcuts_equal_the_originals_interpolation():
    F = torch.nn.functional
    torch.manual_seed(0)
    for size in (14, 15, 56, 58):
        x = torch.randn(2, 3, size, size + 2, dtype=torch.float64)
        for factor in (2, 3, 4):  # the average pools equal the bilinear downscale (3: interpolation itself)
            ref = F.interpolate(x, scale_factor=1 / factor, mode="bilinear", align_corners=False)
            torch.testing.assert_close(bilinear_downscale(x, factor), ref, rtol=0, atol=1e-12)
    # the level-1 1x1 conv commutes with the x2 upsampling (bilinear weights sum to 1: the bias too)
    conv = torch.nn.Conv2d(8, 4, 1).double()
    x = torch.randn(1, 8, 14, 14, dtype=torch.float64)
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(bilinear_resize(conv(x), scale_factor=2), conv(up), rtol=0, atol=1e-12)
    # under autocast the resize keeps the input's dtype (no float32 round trip)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bilinear_resize(x.to(torch.bfloat16), (20, 20)).dtype == torch.bfloat16


def _as_original(sd: dict) -> dict:
    """Our state dict under the original code's names, with its aliases and never-run parts."""
    out = {}
    for k, v in sd.items():
        if k.startswith("hlaem."):
            continue  # never a registered module there
        k = re.sub(r"\.blocks\.(\d+)\.norm\.", r".blocks.\1.ln_1.", k) if ".vmunet." in k else k
        k = k.replace(".op.", ".self_attention.")
        out["module." + k] = v.clone()
        if k.startswith("All2Cross.pyramid.resnet_layers.5."):
            out["module." + k.replace("resnet_layers.5.", "p2.")] = v.clone()
        if k.startswith("ConvUp_s.conv_tower."):
            out["module." + k.replace("conv_tower", "convs_level")] = v.clone()
    out["module.All2Cross.pyramid.vmunet.layers_up.0.blocks.0.ln_1.weight"] = torch.ones(768)
    out["module.All2Cross.pyramid.vmunet.layers.3.blocks.0.ln_1.weight"] = torch.ones(768)
    out["module.All2Cross.pyramid.vmunet.final_conv.weight"] = torch.ones(9, 24, 1, 1)
    return out


def test_load_original_mssmamba_checkpoint(tmp_path):
    torch.manual_seed(1)
    src = mssmamba(1, 9, 64)
    path = tmp_path / "mssmamba_epoch_399.pth"
    torch.save(_as_original(src.state_dict()), path)
    torch.manual_seed(2)
    dst = mssmamba(1, 9, 64)
    hlaem_before = {k: v.clone() for k, v in dst.hlaem.state_dict().items()}
    report = load_pretrained(dst, str(path))
    assert report["source"] == "mssmamba" and not report["missing"] and not report["unexpected"]
    for k, v in src.state_dict().items():
        if not k.startswith("hlaem."):
            assert torch.equal(dst.state_dict()[k], v), k
    for k, v in dst.hlaem.state_dict().items():
        assert torch.equal(v, hlaem_before[k])  # not in such checkpoints: left as initialised


def test_load_vmamba_v0_checkpoint_into_ssm_stages(tmp_path):
    torch.manual_seed(3)
    donor = mssmamba(1, 9, 64).All2Cross.pyramid.vmunet.layers
    sd = {}
    for k, v in donor.state_dict().items():
        k = re.sub(r"\.norm\.", ".ln_1.", k, count=1) if ".blocks." in k and ".norm." in k else k
        sd["layers." + k.replace(".op.", ".self_attention.")] = v.clone()
    sd["patch_embed.proj.weight"] = torch.zeros(96, 3, 4, 4)
    sd["layers.3.blocks.0.ln_1.weight"] = torch.ones(768)
    sd["head.weight"] = torch.zeros(1000, 768)
    path = tmp_path / "vmamba_small_e238_ema.pth"
    torch.save({"model": sd}, path)
    model = mssmamba(1, 9, 64)
    report = load_pretrained(model, str(path))
    assert report["source"] == "vmamba" and not report["missing"] and not report["unexpected"]
    for k, v in donor.state_dict().items():
        assert torch.equal(model.All2Cross.pyramid.vmunet.layers.state_dict()[k], v), k
    with pytest.raises(ValueError, match="neither an MSSMamba nor a VMamba"):
        checkpoint_filter_fn({"conv.weight": torch.zeros(1)})
