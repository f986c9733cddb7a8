"""MSVM-UNet (Chen, Yu, Min, Wang, "MSVM-UNet: Multi-Scale Vision Mamba UNet for Medical Image
Segmentation", arXiv 2408.13735; original code gndlwch2w/msvm-unet).

Architecture, as in the original code:

- Encoder: VMamba v2 "tiny_0230s" (VMamba-Tiny): channel-first (``ln2d``) stem of two 3x3
  stride-2 convs (``layer0``, ``layer1``), 4 stages of VSS blocks (widths 96, 192, 384, 768,
  depths 2, 2, 8, 2; SS2D ``v05_noz``: d_state 1, ssm_ratio 1, no z gate, conv without bias; MLP
  ratio 4), 3x3 stride-2 conv + LayerNorm2d downsampling between stages ("v3"), stochastic depth
  0 -> 0.2. Returns the four stage maps (before downsampling).
- Decoder: three UpBlocks (768->384->192->96): LKPE x2 upsampling, concatenation with the skip,
  1x1 ``concat_layer``, then an MSVSS stage of 2 VSS blocks whose MLP is the multi-scale FFN
  (depth-wise 1/3/5 convs, ``MSMLP``); stochastic depth 0.2 -> 0 across the 6 decoder blocks.
  Head: FLKPE (x4 large-kernel patch expanding) and a 1x1 conv to the classes.
- Grey-scale input: the network takes 3 channels; a 1-channel input is repeated to 3 channels in
  ``forward`` (as the original does), so ImageNet-pretrained stems apply unchanged.

Module and parameter names equal the original's, so an original MSVM-UNet checkpoint loads with
no renaming (``state_dict`` keys and shapes are checked against it in the tests), and
:func:`checkpoint_filter_fn` maps a VMamba ImageNet checkpoint onto ``encoder.*``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .blocks import LayerNorm2d, Linear2d, Mlp, VSSBlock
from .blocks.layers import norm_before_linear
from .checkpoint import load_mapped, read_state_dict, tensors_of
from .compile import Compilable, CompilableSequential, maybe_compiled
from .vssm import init_vmamba_v0_weights

__all__ = [
    "MSVMUNet",
    "VMambaEncoder",
    "MSVMDecoder",
    "LKPE",
    "FLKPE",
    "MSConv",
    "MSMLP",
    "msvmunet_tiny",
    "msvmunet_small",
    "checkpoint_filter_fn",
    "load_pretrained",
]

# VMamba v2 "tiny_0230s" / "small_0229s" settings (original model/vmamba/__init__.py)
VMAMBA_VARIANTS = {
    "tiny_0230s": dict(depths=(2, 2, 8, 2), drop_path_rate=0.2),
    "small_0229s": dict(depths=(2, 2, 20, 2), drop_path_rate=0.3),
}


def _vss_stage(dim: int, drop_path: Sequence[float], mlp_layer=None, **vss_kwargs) -> nn.Sequential:
    kwargs = dict(
        channel_first=True, ssm_d_state=1, ssm_ratio=1.0, ssm_conv_bias=False, ssm_with_z=False, mlp_ratio=4.0
    )
    kwargs.update(vss_kwargs)
    if mlp_layer is not None:
        kwargs["mlp_layer"] = mlp_layer
    blocks = [VSSBlock(dim, drop_path=dp, **kwargs) for dp in drop_path]
    return nn.Sequential(OrderedDict(blocks=nn.Sequential(*blocks)))


def _pixel_shuffle_channels_last_order(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, s*s*C, H, W) with channels ordered (p1, p2, c) -> (B, C, s*H, s*W)."""
    b, ch, h, w = x.shape
    c = ch // (scale * scale)
    x = x.view(b, scale, scale, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c, h * scale, w * scale)


class MSConv(nn.Module):
    """``x + sum_k dwconv_k(x)`` with depth-wise kernels (1, 3, 5), no bias (MSVM-UNet's MS-FFN core).

    The parameters are the original's (``dw_convs.{i}.weight``, one depth-wise conv per kernel
    size), but ``forward`` runs one depth-wise convolution whose kernel is their sum, each centred
    in the largest, plus the identity at the centre: the same linear map (and the same gradients
    for every weight) in one pass over the map instead of three convolutions and three additions.
    On CPU it also keeps the 1x1 depth-wise conv off PyTorch's group-by-group fallback, which
    single-threaded, batch < 16 convolutions with 1x1 kernels take (3-4x slower training steps of
    this module; see the MSVM-UNet bundle's docs).

    Args:
        dim: channels (every convolution is depth-wise over them).
        kernel_sizes: the odd kernel sizes of the parallel depth-wise convolutions.
        fused: run the one summed convolution (default); ``False`` runs the original's form (three
            convolutions and the sum), which :func:`common.networks.complexity.count_flops` uses so
            that FLOPs follow the paper's count. ONNX export always writes that form (the exporter
            cannot give a computed kernel a static shape).
    """

    def __init__(self, dim: int, kernel_sizes: Sequence[int] = (1, 3, 5), fused: bool = True) -> None:
        super().__init__()
        self.fused = fused
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"MSConv needs odd kernel sizes (centred, 'same' padding), got {tuple(kernel_sizes)}")
        self.kernel = max(kernel_sizes)
        self.dw_convs = nn.ModuleList(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False) for k in kernel_sizes
        )

    def fused_weight(self) -> torch.Tensor:
        """The one ``(dim, 1, K, K)`` depth-wise kernel equal to the identity plus every ``dw_convs``."""
        big = self.kernel
        weight = sum(nn.functional.pad(conv.weight, [(big - conv.kernel_size[0]) // 2] * 4) for conv in self.dw_convs)
        # the identity as a padded 1x1 one: no element write from a Python number, which on CUDA is a
        # synchronising host-to-device copy (a CUDA-graph training step must not hold one)
        centre = nn.functional.pad(torch.ones(1, 1, 1, 1, dtype=weight.dtype, device=weight.device), [big // 2] * 4)
        return weight + centre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the ONNX exporter cannot give the computed kernel a static shape: it exports the original's form
        if not self.fused or torch.onnx.is_in_onnx_export():
            out = x
            for conv in self.dw_convs:
                out = out + conv(x)
            return out
        return nn.functional.conv2d(x, self.fused_weight(), padding=self.kernel // 2, groups=x.shape[1])


class MSMLP(Mlp):
    """Multi-scale FFN: ``fc1 -> GELU -> dropout -> MSConv -> fc2 -> dropout`` (channel-first).

    :class:`common.networks.blocks.Mlp` with depth-wise multi-scale convolutions after the
    activation; same call signature, so it plugs into ``VSSBlock(mlp_layer=MSMLP)``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        channel_first: bool = True,
        kernel_sizes: Sequence[int] = (1, 3, 5),
    ) -> None:
        if not channel_first:
            raise ValueError("MSMLP works on channel-first (B, C, H, W) maps; use channel_first=True")
        super().__init__(in_features, hidden_features, out_features, act_layer, drop, channel_first=True)
        self.multiscale_conv = MSConv(self.fc1.out_features, kernel_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(self.multiscale_conv(x)))


class LKPE(Compilable, nn.Module):
    """Large-kernel patch expanding: 1x1 conv (x ``scale**2 * out_dim / dim``), BN, ReLU, 3x3
    depth-wise conv, pixel shuffle by ``scale``, LayerNorm. ``(B, dim, H, W) -> (B, out_dim, sH, sW)``.

    ``LKPE(dim)`` is the decoder's x2 up-sampler (``out_dim = dim // 2``).
    """

    def __init__(self, dim: int, scale: int = 2, out_dim: int | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim or dim // scale
        hidden = scale * scale * self.out_dim
        self.expand = nn.Sequential(
            nn.Conv2d(dim, hidden, kernel_size=1, bias=True),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden, bias=True),
        )
        self.norm = LayerNorm2d(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_compiled(self, type(self)._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.expand_shuffle(x))

    def expand_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """The expanded, pixel-shuffled map before the norm."""
        return _pixel_shuffle_channels_last_order(self.expand(x), self.scale)


class FLKPE(LKPE):
    """Final LKPE: x4 expanding to ``dim`` channels, LayerNorm, then a 1x1 conv to the classes."""

    def __init__(self, dim: int, num_classes: int, scale: int = 4) -> None:
        super().__init__(dim, scale=scale, out_dim=dim)
        self.out = nn.Conv2d(dim, num_classes, kernel_size=1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(norm_before_linear(self.norm, self.expand_shuffle(x)))  # out reads it in its autocast dtype


class VMambaEncoder(nn.Module):
    """VMamba v2 backbone (``ln2d``, patch embed "v2", downsample "v3") returning the 4 stage maps.

    Args:
        in_channels: image channels.
        dims: stage widths.
        depths: VSS blocks per stage.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks.
        ssm_d_state, ssm_ratio, ssm_conv, ssm_conv_bias: SS2D settings (VMamba-T 0230s: 1, 1.0, 3, False).
        mlp_ratio: VSS MLP width ratio.
        use_checkpoint: gradient checkpointing inside the VSS blocks.
        scan_backend: selective-scan backend (``None``: automatic).
    """

    def __init__(
        self,
        in_channels: int = 3,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 8, 2),
        drop_path_rate: float = 0.2,
        ssm_d_state: int = 1,
        ssm_ratio: float = 1.0,
        ssm_conv: int = 3,
        ssm_conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        use_checkpoint: bool = False,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError(f"VMambaEncoder: dims {tuple(dims)} and depths {tuple(depths)} differ in length")
        self.dims = tuple(dims)
        stem = dims[0] // 2
        # Identity placeholders keep the original's Sequential indices (and so its checkpoint keys)
        self.layer0 = CompilableSequential(
            nn.Conv2d(in_channels, stem, 3, stride=2, padding=1), nn.Identity(), LayerNorm2d(stem), nn.Identity(),
            nn.GELU(),
        )
        self.layer1 = CompilableSequential(
            nn.Conv2d(stem, dims[0], 3, stride=2, padding=1), nn.Identity(), LayerNorm2d(dims[0])
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        vss = dict(ssm_d_state=ssm_d_state, ssm_ratio=ssm_ratio, ssm_conv=ssm_conv, ssm_conv_bias=ssm_conv_bias,
                   mlp_ratio=mlp_ratio, use_checkpoint=use_checkpoint, scan_backend=scan_backend)
        self.layers = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, dim in enumerate(dims):
            self.layers.append(_vss_stage(dim, dpr[sum(depths[:i]) : sum(depths[: i + 1])], **vss))
            if i < len(dims) - 1:
                self.downsamples.append(CompilableSequential(
                    nn.Identity(), nn.Conv2d(dim, dims[i + 1], 3, stride=2, padding=1), nn.Identity(),
                    LayerNorm2d(dims[i + 1]),
                ))
            else:
                self.downsamples.append(nn.Identity())
        init_vmamba_v0_weights(self)  # VMamba's VSSM init: truncated-normal linear weights, unit LayerNorms

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer1(self.layer0(x))
        features = []
        for layer, down in zip(self.layers, self.downsamples):
            x = layer(x)
            features.append(x)
            x = down(x)
        return features


class UpBlock(nn.Module):
    """LKPE x2 -> concat skip -> 1x1 ``concat_layer`` -> MSVSS stage (``depth`` VSS blocks with MS-FFN)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, drop_path: Sequence[float],
                 use_checkpoint: bool = False, scan_backend: str | None = None) -> None:
        super().__init__()
        self.up = LKPE(in_channels)
        self.concat_layer = Linear2d(2 * out_channels, out_channels)
        self.vss_layer = _vss_stage(out_channels, list(drop_path)[:depth], mlp_layer=MSMLP,
                                    use_checkpoint=use_checkpoint, scan_backend=scan_backend)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.vss_layer(self.concat_layer(torch.cat((self.up(x), skip), dim=1)))


class MSVMDecoder(nn.Module):
    """Three UpBlocks over the reversed encoder widths, then FLKPE to ``num_classes`` at input size."""

    def __init__(self, dims: Sequence[int], num_classes: int, depths: Sequence[int] = (2, 2, 2, 2),
                 drop_path_rate: float = 0.2, use_checkpoint: bool = False, scan_backend: str | None = None) -> None:
        super().__init__()
        dpr = torch.linspace(drop_path_rate, 0, (len(dims) - 1) * 2).tolist()
        self.layers = nn.ModuleList(
            UpBlock(dims[i - 1], dims[i], depths[i], dpr[sum(depths[: i - 1]) : sum(depths[:i])],
                    use_checkpoint=use_checkpoint, scan_backend=scan_backend)
            for i in range(1, len(dims))
        )
        self.out_layers = nn.Sequential(FLKPE(dims[-1], num_classes))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = features[0]
        for layer, skip in zip(self.layers, features[1:]):
            out = layer(out, skip)
        return self.out_layers[0](out)


class MSVMUNet(nn.Module):
    """MSVM-UNet: VMamba encoder + multi-scale VSS decoder with large-kernel patch expanding.

    Args:
        in_channels: channels of the input image (1 for grey-scale MRI/CT: repeated to the encoder's 3).
        num_classes: output channels (logits), background included.
        variant: VMamba encoder variant, ``"tiny_0230s"`` (the paper's) or ``"small_0229s"``.
        encoder_in_channels: channels the encoder stem takes (3: ImageNet-pretrained stems apply).
        decoder_depths: VSS blocks of each decoder stage (index i for the i-th UpBlock, from 1).
        decoder_drop_path_rate: stochastic depth of the decoder, linear from this to 0.
        use_checkpoint: gradient checkpointing in every VSS block (less memory, slower).
        scan_backend: selective-scan backend for all SS2D blocks (``None``: automatic).

    Input ``(B, in_channels, H, W)`` with H and W multiples of 32; output logits
    ``(B, num_classes, H, W)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        variant: str = "tiny_0230s",
        encoder_in_channels: int = 3,
        decoder_depths: Sequence[int] = (2, 2, 2, 2),
        decoder_drop_path_rate: float = 0.2,
        use_checkpoint: bool = False,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        if variant not in VMAMBA_VARIANTS:
            raise ValueError(f"MSVMUNet: unknown variant {variant!r}; choose one of {sorted(VMAMBA_VARIANTS)}")
        if in_channels not in (1, encoder_in_channels):
            raise ValueError(
                f"MSVMUNet: in_channels must be 1 (repeated) or {encoder_in_channels}, got {in_channels}"
            )
        self.in_channels, self.num_classes = in_channels, num_classes
        self.encoder_in_channels = encoder_in_channels
        self.encoder = VMambaEncoder(encoder_in_channels, use_checkpoint=use_checkpoint, scan_backend=scan_backend,
                                     **VMAMBA_VARIANTS[variant])
        self.decoder = MSVMDecoder(self.encoder.dims[::-1], num_classes, depths=decoder_depths,
                                   drop_path_rate=decoder_drop_path_rate, use_checkpoint=use_checkpoint,
                                   scan_backend=scan_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"MSVMUNet expects (B, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"MSVMUNet built for {self.in_channels} input channel(s), got {x.shape[1]}")
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"MSVMUNet needs H and W divisible by 32, got {tuple(x.shape[-2:])}")
        if x.shape[1] == 1 and self.encoder_in_channels != 1:
            x = x.repeat(1, self.encoder_in_channels, 1, 1)
        return self.decoder(self.encoder(x)[::-1])

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Stop (or restart) training the encoder: the recipe freezes it for the first epochs."""
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)

    def unfreeze_encoder(self) -> None:
        self.freeze_encoder(False)


def msvmunet_tiny(in_channels: int = 1, num_classes: int = 4, **kwargs) -> MSVMUNet:
    """MSVM-UNet with the VMamba-Tiny (0230s) encoder: the paper's model."""
    return MSVMUNet(in_channels, num_classes, variant="tiny_0230s", **kwargs)


def msvmunet_small(in_channels: int = 1, num_classes: int = 4, **kwargs) -> MSVMUNet:
    """MSVM-UNet with the VMamba-Small (0229s) encoder (an option of the original code)."""
    return MSVMUNet(in_channels, num_classes, variant="small_0229s", **kwargs)


# --------------------------------------------------------------------------------------------
# Foreign checkpoints
# --------------------------------------------------------------------------------------------

_VMAMBA_STEM = {"patch_embed.0.": "layer0.0.", "patch_embed.2.": "layer0.2.",
                "patch_embed.5.": "layer1.0.", "patch_embed.7.": "layer1.2."}
_VMAMBA_SKIP = re.compile(r"^(classifier\.|head\.|norm\.|pos_embed$)")


def checkpoint_filter_fn(state_dict: dict, model: MSVMUNet | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Map a foreign checkpoint's keys onto :class:`MSVMUNet`'s (timm's ``checkpoint_filter_fn`` idea).

    Recognises:

    - an original MSVM-UNet checkpoint (``encoder.*`` / ``decoder.*``; a ``module.`` prefix from
      DataParallel is removed): names are already ours;
    - a VMamba v2 ImageNet checkpoint (``patch_embed.*``, ``layers.N.blocks.*``,
      ``layers.N.downsample.*``, ``classifier.*``): the stem maps to ``encoder.layer0/1``,
      ``layers.N.downsample`` to ``encoder.downsamples.N``, blocks to ``encoder.layers.N.blocks``,
      older block names ``ln_1`` / ``self_attention`` to ``norm`` / ``op``; the classifier is dropped.

    Returns the mapped dict and the detected source (``"msvmunet"`` or ``"vmamba"``).
    """
    sd = tensors_of(state_dict)
    if any(k.startswith(("encoder.", "decoder.")) for k in sd):
        return sd, "msvmunet"
    if not any(k.startswith(("patch_embed.", "layers.")) for k in sd):
        raise ValueError("checkpoint is neither an MSVM-UNet nor a VMamba checkpoint (no encoder.*, "
                         "decoder.*, patch_embed.* or layers.* keys)")
    out = {}
    for k, v in sd.items():
        if _VMAMBA_SKIP.match(k):
            continue
        for old, new in _VMAMBA_STEM.items():
            if k.startswith(old):
                k = new + k[len(old):]
        k = re.sub(r"^layers\.(\d+)\.downsample\.", r"downsamples.\1.", k)
        k = k.replace(".ln_1.", ".norm.").replace(".self_attention.", ".op.")
        out["encoder." + k] = v
    return out, "vmamba"


def load_pretrained(model: MSVMUNet, path: str, strict: bool | None = None) -> dict:
    """Load an MSVM-UNet or VMamba checkpoint file into ``model`` (``torch.load(weights_only=True)``).

    Tensors whose shape differs from the model's (for example a head trained for another number of
    classes) are skipped and reported. ``strict`` (default: True for MSVM-UNet checkpoints, False
    for VMamba encoder checkpoints) raises when keys are missing or unexpected.

    Returns a report: ``source``, ``loaded`` (count), ``missing``, ``unexpected``, ``shape_mismatch``.
    """
    mapped, source = checkpoint_filter_fn(read_state_dict(path), model)
    expected = model.state_dict().keys() if source == "msvmunet" else \
        [k for k in model.state_dict() if k.startswith("encoder.")]
    return load_mapped(model, mapped, source, expected, (source == "msvmunet") if strict is None else strict, path)
