"""MSVM-UNet: faithfulness to the original (keys, shapes, parameter count, FLOPs) and checkpoints."""

from __future__ import annotations

import os
import re

import pytest
import torch

from common.networks.complexity import count_flops, count_parameters
from common.networks.msvmunet import (
    MSConv,
    MSVMUNet,
    checkpoint_filter_fn,
    load_pretrained,
    msvmunet_tiny,
)

SPEC_TSV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "specs",
                        "msvmunet_original_state_dict.tsv")


@pytest.fixture(scope="module")
def model9():
    torch.manual_seed(0)
    return msvmunet_tiny(in_channels=3, num_classes=9)


def test_parameter_counts_match_the_original(model9):
    # measured from the original code (../shared/specs/msvmunet.md)
    assert count_parameters(model9) == 35_925_513
    assert count_parameters(model9.encoder) == 29_478_528
    assert count_parameters(model9.decoder) == 6_446_985
    assert count_parameters(msvmunet_tiny(1, 4)) == 35_925_028


@pytest.mark.skipif(not os.path.isfile(SPEC_TSV), reason="../shared/specs is not beside this checkout")
def test_state_dict_keys_and_shapes_equal_the_original_checkpoint(model9):
    want = {}
    with open(SPEC_TSV) as f:
        for line in f:
            key, shape = line.rstrip("\n").split("\t")
            want[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    got = {k: tuple(v.shape) for k, v in model9.state_dict().items()}
    assert got == want


def test_forward_shapes_grey_input_and_errors():
    torch.manual_seed(0)
    model = msvmunet_tiny(1, 4).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, 64, 96))
    assert y.shape == (2, 4, 64, 96)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 1, 60, 64))
    with pytest.raises(ValueError, match="1 input channel"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="unknown variant"):
        MSVMUNet(variant="huge")


def test_grey_input_is_the_rgb_network_on_repeated_channels():
    torch.manual_seed(0)
    grey = msvmunet_tiny(1, 4).eval()
    rgb = msvmunet_tiny(3, 4).eval()
    rgb.load_state_dict(grey.state_dict())
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)))


def test_flops_agree_with_the_paper():
    # paper (arXiv 2408.13735, calflops at 3x224x224): 15.53 GFLOPs, 35.93 M parameters
    flops = count_flops(msvmunet_tiny(1, 9), (1, 1, 224, 224))
    calflops_style = 2 * flops["dense_macs"] / 1e9
    assert abs(calflops_style - 15.53) / 15.53 < 0.01
    assert flops["scan"] > 0 and flops["fvcore"] == flops["dense_macs"] + flops["scan"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_msconv_one_summed_convolution_equals_the_three(channels_last):
    """MSConv's fused form (one depth-wise conv with the summed kernels and the identity) against
    the original's x + conv1(x) + conv3(x) + conv5(x): values and the gradients of the input and of
    every kernel, in float64; the parameters and their names are the original's."""
    torch.manual_seed(0)
    fused = MSConv(12).double()
    plain = MSConv(12, fused=False).double()
    plain.load_state_dict(fused.state_dict())
    assert sorted(fused.state_dict()) == [f"dw_convs.{i}.weight" for i in range(3)]
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grads = []
    for module in (fused, plain):
        xi = x.clone().requires_grad_()
        out = module(xi)
        torch.autograd.backward(out, torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out))
        grads.append((out.detach(), xi.grad, *(c.weight.grad for c in module.dw_convs)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="odd kernel sizes"):
        MSConv(4, (1, 2))


def test_freeze_encoder():
    model = msvmunet_tiny(1, 4)
    model.freeze_encoder()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    model.unfreeze_encoder()
    assert all(p.requires_grad for p in model.parameters())


def _to_vmamba_keys(encoder_sd: dict) -> dict:
    """Our encoder's tensors under the names of a VMamba v2 ImageNet checkpoint (older block names)."""
    stem = {"layer0.0.": "patch_embed.0.", "layer0.2.": "patch_embed.2.",
            "layer1.0.": "patch_embed.5.", "layer1.2.": "patch_embed.7."}
    out = {}
    for k, v in encoder_sd.items():
        for new, old in stem.items():
            if k.startswith(new):
                k = old + k[len(new):]
        k = re.sub(r"^downsamples\.(\d+)\.", r"layers.\1.downsample.", k)
        k = k.replace(".norm.", ".ln_1.", 1) if ".blocks." in k and ".norm." in k else k
        k = k.replace(".op.", ".self_attention.")
        out[k] = v.clone()
    out["classifier.norm.weight"] = torch.ones(768)
    out["classifier.head.weight"] = torch.zeros(1000, 768)
    return out


def test_load_original_msvmunet_checkpoint(tmp_path):
    torch.manual_seed(1)
    src = msvmunet_tiny(1, 4)
    path = tmp_path / "msvmunet_acdc_best.pth"
    torch.save({"epoch": 120, "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst = msvmunet_tiny(1, 4)
    report = load_pretrained(dst, str(path))
    assert report["source"] == "msvmunet" and not report["missing"] and not report["unexpected"]
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_vmamba_imagenet_checkpoint_into_encoder(tmp_path):
    torch.manual_seed(2)
    donor = msvmunet_tiny(3, 4)
    path = tmp_path / "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    torch.save({"model": _to_vmamba_keys(donor.encoder.state_dict())}, path)
    torch.manual_seed(3)
    model = msvmunet_tiny(1, 4)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    report = load_pretrained(model, str(path))
    assert report["source"] == "vmamba"
    assert report["loaded"] == len(model.encoder.state_dict()) and not report["missing"]
    assert report["unexpected"] == []  # the ImageNet classifier is dropped by the key mapping
    for k, v in donor.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k]), k


def test_checkpoint_filter_drops_classifier_and_renames():
    sd, source = checkpoint_filter_fn({"model": {"patch_embed.0.weight": torch.zeros(1),
                                                 "layers.2.downsample.1.bias": torch.zeros(1),
                                                 "layers.0.blocks.1.self_attention.Ds": torch.zeros(1),
                                                 "layers.0.blocks.1.ln_1.weight": torch.zeros(1),
                                                 "classifier.head.bias": torch.zeros(1)}})
    assert source == "vmamba"
    assert sorted(sd) == ["encoder.downsamples.2.1.bias", "encoder.layer0.0.weight",
                          "encoder.layers.0.blocks.1.norm.weight", "encoder.layers.0.blocks.1.op.Ds"]


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    model = msvmunet_tiny(1, 4)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_pretrained(model, str(tmp_path / "missing.pt"))
    other = tmp_path / "unet.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="neither an MSVM-UNet nor a VMamba"):
        load_pretrained(model, str(other))
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": model.state_dict(), "opts": re.compile("x")}, pickled)  # needs unpickling code
    with pytest.raises(ValueError, match="weights_only=True"):
        load_pretrained(model, str(pickled))
    nine = tmp_path / "synapse.pt"
    torch.save(msvmunet_tiny(1, 9).state_dict(), nine)
    with pytest.raises(ValueError, match="another shape"):
        load_pretrained(model, str(nine))
    report = load_pretrained(model, str(nine), strict=False)  # fine-tuning from another class count
    assert report["shape_mismatch"] == ["decoder.out_layers.0.out.weight", "decoder.out_layers.0.out.bias"]
