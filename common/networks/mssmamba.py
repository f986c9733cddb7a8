"""MSSMamba: hybrid multi-scale spatial-state Mamba with frequency-adaptive boundary refinement
(original code JSJ515-Group/MSSMamba, read at commit c7f0f9c; details and citations in
``mssmamba_synapse/docs/original_code_notes.md``).

A HiFormer-style two-branch encoder in which HiFormer's Swin stages are replaced by VMamba v0
(VM-UNet) stages:

- CNN branch: ResNet-50 stem + layer1..3 (256, 512, 1024 channels at 1/4, 1/8, 1/16).
- Mamba branch, three levels, each fusing both branches by addition:
  level 1: the x2-upsampled layer1 map -> 1x1 conv to 96 -> VSS layer 0 (2 blocks at 1/2 scale,
  patch merging to 192 at 1/4) -> 1x1 to 96, + MSACB(layer1); level 2: 1x1 to 192 -> VSS layer 1
  -> 1x1 to 192, + MSACB(1x1(layer2)); level 3: 1x1 to 384 -> VSS layer 2 (9 blocks) -> 1x1 to
  384, + MSACB(1x1(layer3)).
- MSACB (multi-scale attention convolution block): at scales 1, 1/2, 1/4, a 3x3 conv + BN + ReLU
  + CBAM-style channel and spatial attention, resized back, concatenated, fused by a 1x1 conv.
- Tokens of level 1 (96 ch, 1/4) and level 3 (384 ch, 1/16), each with a CLS token (mean of the
  LayerNormed tokens) and learned position embeddings, go through ``MultiScaleBlock``: each CLS
  token takes a projection round trip to the other branch's width and back (the published code's
  fusion stage is empty for the configured depth ``[[1, 2, 0]]``: no cross-attention), then 1 and
  2 ViT blocks on the two branches; then a LayerNorm per branch.
- Decoder (HiFormer's): ConvUpsample of the 1/16 map (two conv-GN-ReLU-x2 stages) and of the 1/4
  map (one conv-GN-ReLU) to 128 channels at 1/4, each refined by HLAEM (high/low frequency
  adaptive enhancement: the high-frequency residual through a CMUNeXt block, the low-frequency
  map through MEEM's multi-scale edge enhancer, channel attention, residual), summed; 1x1 conv to
  16 + ReLU + bilinear x4; 3x3 segmentation head.

Deviations from the published code, each forced by a defect there (see the notes, section 4):
HLAEM is one registered, trained submodule shared by both branches (the code built it inside
``forward`` with fresh random weights on every call); only the three VSS layers that run are built
(the code also built the whole unused VM-UNet decoder: 31 M dead parameters); the decoder follows
HiFormer's source (the code's ``Decoder.py`` is missing). Module names follow the original, so
its checkpoints map with :func:`checkpoint_filter_fn` (aliases and unused parts dropped, VSS
block names ``ln_1`` / ``self_attention`` renamed).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DropPath, Mlp
from .checkpoint import load_mapped, read_state_dict, tensors_of
from .resnet import resnet50_trunk
from .vssm import VSSLayer, init_vmamba_v0_weights, remap_vmamba_v0_keys

__all__ = [
    "MSSMamba",
    "MSACBlock",
    "HLAEM",
    "MultiScaleBlock",
    "ConvUpsample",
    "mssmamba",
    "checkpoint_filter_fn",
    "load_pretrained",
]


def _conv_bn_act(cin: int, cout: int, k: int, act: nn.Module, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias), nn.BatchNorm2d(cout), act)


# -------------------------------------------------------------------------------- resizing
# The original resizes with F.interpolate(mode="bilinear") throughout. Two facts make the same
# numbers cheaper on a GPU (benchmarks/README.md, "One slice outside the scan"):
# - a bilinear downscale by 1/2 or 1/4 (align_corners=False, scale_factor given) samples each output
#   at the centre between two input pixels per axis, i.e. it is an average pool of 2 x 2 pixels
#   (offset 1 and stride 4 for 1/4);
# - PyTorch's CUDA bilinear kernel for channel-first maps runs one thread per output pixel, looping
#   over batch x channels (a few thousand threads for one 56 x 56 slice); its channels-last kernel
#   runs one per output element. Under autocast it also runs in float32 (two extra casts).

RESIZE_CHANNELS_LAST = True  # CUDA: resize channel-first maps through the channels-last kernel


def bilinear_downscale(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=1 / factor, mode="bilinear", align_corners=False)``, for the
    factors 1, 2 and 4 computed as the average pool it equals (other factors: interpolation)."""
    if factor == 1:
        return x
    if factor == 2:
        return F.avg_pool2d(x, 2)
    if factor == 4:
        h, w = x.shape[-2] // 4, x.shape[-1] // 4
        return F.avg_pool2d(x[..., 1:, 1:], 2, stride=4)[..., :h, :w]
    return bilinear_resize(x, scale_factor=1 / factor)


def bilinear_resize(x: torch.Tensor, size: Sequence[int] | None = None, scale_factor: float | None = None,
                    align_corners: bool = False) -> torch.Tensor:
    """``F.interpolate(..., mode="bilinear")`` in the input's dtype (also under autocast), on CUDA
    through the channels-last kernel (the result is then channels-last: same values)."""
    if x.is_cuda and RESIZE_CHANNELS_LAST and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, enabled=False):
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=align_corners)


class BilinearUpsample(nn.Module):
    """``nn.Upsample(scale_factor, mode="bilinear")`` through :func:`bilinear_resize`."""

    def __init__(self, scale_factor: int, align_corners: bool = False) -> None:
        super().__init__()
        self.scale_factor, self.align_corners = scale_factor, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bilinear_resize(x, scale_factor=self.scale_factor, align_corners=self.align_corners)


# ----------------------------------------------------------------------------------------- MSACB


class ChannelAttention(nn.Module):
    """CBAM channel attention: sigmoid(fc(avgpool) + fc(maxpool)), shared 1x1-conv MLP."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1, bias=False), nn.ReLU(inplace=True),
                                nn.Conv2d(channels // reduction, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # means and maxima over the map (adaptive pools to 1 x 1; the max as a reduction: faster on CUDA)
        return torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)) + self.fc(x.amax((2, 3), keepdim=True)))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: sigmoid(conv_k([mean_c, max_c]))."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv1(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


class CombinedAttentionModule(nn.Module):
    """Channel attention, then spatial attention, each multiplied into the features."""

    def __init__(self, channels: int, reduction: int = 4, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel_attention = ChannelAttention(channels, reduction)
        self.spatial_attention = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_attention(x)
        return x * self.spatial_attention(x)


class MSACBlock(nn.Module):
    """Multi-scale attention convolution block.

    For each scale ``s`` in ``scale_factors``: bilinear resize by ``1/s``, 3x3 conv + BN + ReLU +
    :class:`CombinedAttentionModule`, resize back; the branches are concatenated and fused by a
    1x1 conv. ``(B, in, H, W) -> (B, out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, scale_factors: Sequence[int] = (1, 2, 4),
                 reduction: int = 4, kernel_size: int = 7) -> None:
        super().__init__()
        self.scale_factors = tuple(scale_factors)
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                          nn.ReLU(inplace=True), CombinedAttentionModule(out_channels, reduction, kernel_size))
            for _ in self.scale_factors
        )
        self.fusion_conv = nn.Conv2d(len(self.scale_factors) * out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = []
        for s, conv in zip(self.scale_factors, self.convs):
            y = conv(bilinear_downscale(x, s))
            outs.append(y if s == 1 else bilinear_resize(y, size))
        return self.fusion_conv(torch.cat(outs, 1))


# ----------------------------------------------------------------------------------------- HLAEM


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class CMUNeXtBlock(nn.Module):
    """CMUNeXt block (depth 1): residual depth-wise 3x3 + GELU + BN, 1x1 x4 + GELU + BN, 1x1 back +
    GELU + BN; then ``up``: 3x3 conv + BN + ReLU."""

    def __init__(self, channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        c = channels
        self.block = nn.Sequential(nn.Sequential(
            _Residual(nn.Sequential(nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c), nn.GELU(),
                                    nn.BatchNorm2d(c))),
            nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.BatchNorm2d(4 * c),
            nn.Conv2d(4 * c, c, 1), nn.GELU(), nn.BatchNorm2d(c),
        ))
        self.up = nn.Module()
        self.up.conv = _conv_bn_act(c, out_channels, 3, nn.ReLU(inplace=True), bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up.conv(self.block(x))


class EdgeEnhancer(nn.Module):
    """``x + sigmoid(BN(conv1x1(x - avgpool3(x))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_conv = _conv_bn_act(channels, channels, 1, nn.Sigmoid())
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_conv(x - self.pool(x))


class MEEM(nn.Module):
    """Multi-scale edge enhancement: 1x1 + BN + sigmoid, then ``width - 1`` rounds of avg-pool +
    1x1 + BN + sigmoid, each round's edge-enhanced map kept; concatenated, 1x1 + BN + ReLU."""

    def __init__(self, in_dim: int, hidden_dim: int, width: int = 4) -> None:
        super().__init__()
        self.in_conv = _conv_bn_act(in_dim, hidden_dim, 1, nn.Sigmoid())
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.mid_conv = nn.ModuleList(_conv_bn_act(hidden_dim, hidden_dim, 1, nn.Sigmoid()) for _ in range(width - 1))
        self.edge_enhance = nn.ModuleList(EdgeEnhancer(hidden_dim) for _ in range(width - 1))
        self.out_conv = _conv_bn_act(hidden_dim * width, in_dim, 1, nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.in_conv(x)
        outs = [mid]
        for conv, edge in zip(self.mid_conv, self.edge_enhance):
            mid = conv(self.pool(mid))
            outs.append(edge(mid))
        return self.out_conv(torch.cat(outs, 1))


class CALayer(nn.Module):
    """Squeeze-and-excitation channel attention (RCAN's CALayer)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(channels // reduction, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_du(self.avg_pool(x))


class HLAEM(nn.Module):
    """High-low frequency adaptive enhancement module (boundary refinement), ``(B, C, H, W)`` -> same.

    ``low = avgpool2(x)``, ``high = x - up(low)``; ``high`` through :class:`CMUNeXtBlock`, ``low``
    through :class:`MEEM` and upsampled; concatenated (high first), 1x1 conv, channel attention,
    3x3 conv, plus ``x``. Upsampling is bilinear with ``align_corners=True`` as in the original.
    """

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.down = nn.AvgPool2d(2)
        self.cmunextblock = CMUNeXtBlock(dim, dim)
        self.meem = MEEM(dim, dim, width=4)
        self.alise1 = nn.Conv2d(2 * dim, dim, 1)
        self.alise2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.att = CALayer(dim, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        low = self.down(x)
        high = x - bilinear_resize(low, size, align_corners=True)
        low_feat = bilinear_resize(self.meem(low), size, align_corners=True)
        fused = self.alise1(torch.cat([self.cmunextblock(high), low_feat], 1))
        return self.alise2(self.att(fused)) + x


# --------------------------------------------------------------------------------------- fusion


class Attention(nn.Module):
    """Multi-head self-attention (timm's names: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, c)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block (timm ``Block`` names: ``norm1``, ``attn``, ``norm2``, ``mlp``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MultiScaleBlock(nn.Module):
    """The published code's two-branch block: each CLS token through a projection to the other
    branch's width and back (``projs`` / ``revert_projs``), then ``depth[i]`` ViT blocks on
    branch ``i``. (HiFormer's CLS cross-attention is not built: the configured fusion depth is 0.)
    """

    def __init__(self, dims: Sequence[int] = (96, 384), depth: Sequence[int] = (1, 2),
                 num_heads: Sequence[int] = (6, 12), mlp_ratio: Sequence[float] = (2.0, 2.0),
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        n = len(dims)
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ViTBlock(dims[i], num_heads[i], mlp_ratio[i], qkv_bias, drop, attn_drop)
                            for _ in range(depth[i])])
            for i in range(n)
        )
        self.projs = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dims[i]), nn.GELU(), nn.Linear(dims[i], dims[(i + 1) % n])) for i in range(n)
        )
        self.revert_projs = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dims[(i + 1) % n]), nn.GELU(), nn.Linear(dims[(i + 1) % n], dims[i]))
            for i in range(n)
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for i, x in enumerate(xs):
            cls = self.revert_projs[i](self.projs[i](x[:, :1]))
            outs.append(self.blocks[i](torch.cat([cls, x[:, 1:]], 1)))
        return outs


# ---------------------------------------------------------------------------------------- encoder


class _VMUNetStages(nn.Module):
    """Holder so that the VSS layers keep the original's key prefix ``vmunet.layers``."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers


class PyramidFeatures(nn.Module):
    """CNN (ResNet-50 to layer3) and Mamba (3 VSS layers) pyramids fused at three levels.

    Returns the level-1 map (96 ch at 1/4) and the level-3 map (384 ch at 1/16), channel-first,
    plus their CLS tokens (means of the LayerNormed tokens).
    """

    def __init__(self, in_channels: int = 3, dims: Sequence[int] = (96, 192, 384, 768),
                 cnn_dims: Sequence[int] = (256, 512, 1024), depths: Sequence[int] = (2, 2, 9, 2),
                 drop_path_rate: float = 0.2, d_state: int = 16, use_checkpoint: bool = False,
                 scan_backend: str | None = None) -> None:
        super().__init__()
        trunk = resnet50_trunk(in_channels, num_stages=3)
        self.resnet_layers = nn.ModuleList([trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool,
                                            trunk.layer1, trunk.layer2, trunk.layer3])
        self.conv_bn_pairs = (("resnet_layers.0", "resnet_layers.1"),)  # the stem's conv and norm
        # stochastic depth as the full 4-stage VSSM (drop_path_rate over sum(depths)) assigns it
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.vmunet = _VMUNetStages(nn.ModuleList(
            VSSLayer(dims[i], depths[i], dpr[sum(depths[:i]) : sum(depths[: i + 1])], d_state=d_state,
                     downsample=True, use_checkpoint=use_checkpoint, scan_backend=scan_backend)
            for i in range(3)
        ))
        self.p1_ch = nn.Conv2d(cnn_dims[0], dims[0], 1)
        self.p2_ch = nn.Conv2d(cnn_dims[1], dims[1], 1)
        self.p3_ch = nn.Conv2d(cnn_dims[2], dims[2], 1)
        self.cs_block1 = MSACBlock(cnn_dims[0], dims[0])
        self.cs_block2 = MSACBlock(dims[1], dims[1])
        self.cs_block3 = MSACBlock(dims[2], dims[2])
        self.norm_1 = nn.LayerNorm(dims[0])
        self.norm_2 = nn.LayerNorm(dims[2])
        self.conv192_96 = nn.Conv2d(dims[1], dims[0], 1)
        self.conv96_192 = nn.Conv2d(dims[0], dims[1], 1)
        self.conv384_192 = nn.Conv2d(dims[2], dims[1], 1)
        self.conv192_384 = nn.Conv2d(dims[1], dims[2], 1)
        self.conv768_384 = nn.Conv2d(dims[3], dims[2], 1)

    @staticmethod
    def _ssm(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Channel-first in, through a channels-last VSS layer, channel-first out."""
        return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @staticmethod
    def _cls(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.flatten(2).transpose(1, 2)).mean(1, keepdim=True)

    def forward(self, x: torch.Tensor):
        r = self.resnet_layers
        fm1 = r[4](r[3](r[2](r[1](r[0](x)))))
        layers = self.vmunet.layers
        # up(x2) then 1x1 conv as in the original, computed in the other order (the same map: both are
        # linear and the bilinear weights sum to 1) so that 96 channels are resized instead of 256
        fm1_ch = bilinear_resize(self.p1_ch(fm1), scale_factor=2)
        m1 = self.conv192_96(self._ssm(layers[0], fm1_ch)) + self.cs_block1(fm1)
        fm2 = r[5](fm1)
        m2 = self.conv384_192(self._ssm(layers[1], self.conv96_192(m1))) + self.cs_block2(self.p2_ch(fm2))
        fm3 = r[6](fm2)
        m3 = self.conv768_384(self._ssm(layers[2], self.conv192_384(m2))) + self.cs_block3(self.p3_ch(fm3))
        return (m1, self._cls(self.norm_1, m1)), (m3, self._cls(self.norm_2, m3))


class All2Cross(nn.Module):
    """Pyramid features -> token sequences with CLS and position embeddings -> MultiScaleBlock -> LN."""

    def __init__(self, img_size: int = 224, in_channels: int = 3, embed_dims: Sequence[int] = (96, 384),
                 patch_sizes: Sequence[int] = (4, 16), mlp_ratio: Sequence[float] = (2.0, 2.0),
                 num_heads: Sequence[int] = (6, 12), depth: Sequence[int] = (1, 2), drop_path_rate: float = 0.2,
                 use_checkpoint: bool = False, scan_backend: str | None = None) -> None:
        super().__init__()
        self.pyramid = PyramidFeatures(in_channels, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint,
                                       scan_backend=scan_backend)
        self.pos_embed = nn.ParameterList(
            nn.Parameter(torch.zeros(1, (img_size // p) ** 2 + 1, d)) for p, d in zip(patch_sizes, embed_dims)
        )
        self.blocks = nn.ModuleList([MultiScaleBlock(embed_dims, depth, num_heads, mlp_ratio)])
        self.norm = nn.ModuleList(nn.LayerNorm(d) for d in embed_dims)
        init_vmamba_v0_weights(self)  # the original's All2Cross._init_weights: trunc-normal linears, unit LNs
        for p in self.pos_embed:
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        xs = []
        for (fmap, cls), pos in zip(self.pyramid(x), self.pos_embed):
            tokens = torch.cat([cls, fmap.flatten(2).transpose(1, 2)], 1)
            if tokens.shape[1] != pos.shape[1]:
                raise ValueError(f"MSSMamba was built for img_size giving {pos.shape[1] - 1} tokens at this level, "
                                 f"got {tokens.shape[1] - 1}: build it with img_size equal to the input size")
            xs.append(tokens + pos)
        for block in self.blocks:
            xs = block(xs)
        return [norm(t) for norm, t in zip(self.norm, xs)]


# ---------------------------------------------------------------------------------------- decoder


class ConvUpsample(nn.Module):
    """HiFormer's ConvUpsample: per output width, 3x3 conv (no bias) + GroupNorm(32) + ReLU (+ x2 up)."""

    def __init__(self, in_chans: int = 384, out_chans: Sequence[int] = (128,), upsample: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for out in out_chans:
            layers += [nn.Conv2d(in_chans, out, 3, padding=1, bias=False), nn.GroupNorm(32, out), nn.ReLU()]
            if upsample:
                layers.append(BilinearUpsample(2))
            in_chans = out
        self.conv_tower = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_tower(x)


class MSSMamba(nn.Module):
    """MSSMamba for 2D segmentation.

    Args:
        in_channels: input channels; 1 (grey CT) is repeated to the 3 the ResNet stem takes.
        num_classes: output classes (Synapse: 9, background included).
        img_size: input height = width (the token position embeddings depend on it; a multiple of 32,
            at least 64).
        drop_path_rate: stochastic depth of the VSS layers (0 -> this over the 4-stage VSSM, as built).
        use_checkpoint: gradient checkpointing of the VSS blocks.
        scan_backend: selective-scan backend (``None``: automatic).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 9, img_size: int = 224,
                 drop_path_rate: float = 0.2, use_checkpoint: bool = False, scan_backend: str | None = None) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"MSSMamba: in_channels must be 1 (repeated to 3) or 3, got {in_channels}")
        if img_size % 32 or img_size < 64:
            raise ValueError(f"MSSMamba: img_size must be a multiple of 32 and at least 64 (at 32 the multi-scale "
                             f"blocks pool the 1 x 1 bottom map to nothing), got {img_size}")
        self.in_channels, self.num_classes, self.img_size = in_channels, num_classes, img_size
        self.All2Cross = All2Cross(img_size, 3, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint,
                                   scan_backend=scan_backend)
        self.ConvUp_s = ConvUpsample(384, (128, 128), upsample=True)
        self.ConvUp_l = ConvUpsample(96, (128,), upsample=False)
        self.hlaem = HLAEM(128)
        self.conv_pred = nn.Sequential(nn.Conv2d(128, 16, 1), nn.ReLU(inplace=True),
                                       BilinearUpsample(4))
        self.segmentation_head = nn.Sequential(nn.Conv2d(16, num_classes, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MSSMamba expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"MSSMamba was built for {self.img_size} x {self.img_size} input, got "
                             f"{tuple(x.shape[-2:])}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        large, small = self.All2Cross(x)
        b = x.shape[0]
        h_l, h_s = self.img_size // 4, self.img_size // 16
        large = large[:, 1:].transpose(1, 2).reshape(b, -1, h_l, h_l)
        small = small[:, 1:].transpose(1, 2).reshape(b, -1, h_s, h_s)
        fused = self.hlaem(self.ConvUp_l(large)) + self.hlaem(self.ConvUp_s(small))
        return self.segmentation_head(self.conv_pred(fused))


def mssmamba(in_channels: int = 1, num_classes: int = 9, img_size: int = 224, **kwargs) -> MSSMamba:
    """MSSMamba as published for Synapse (ResNet-50 + VMamba v0 stages, d_state 16, depths 2/2/9)."""
    return MSSMamba(in_channels, num_classes, img_size, **kwargs)


# ------------------------------------------------------------------------------- foreign checkpoints

_DROP = re.compile(
    r"^(All2Cross\.pyramid\.(p2|p3)\.|All2Cross\.pyramid\.vmunet\.(layers_up|final_up|final_conv|patch_embed|"
    r"layers\.3)\b|ConvUp_[sl]\.convs_level\.)"
)


def checkpoint_filter_fn(state_dict: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Map an original MSSMamba checkpoint, or a VMamba v0 / VM-UNet one, onto :class:`MSSMamba`'s keys.

    - original MSSMamba (``All2Cross.*``, ``ConvUp_*``): the aliases ``pyramid.p2/p3`` and
      ``convs_level``, and the never-run VM-UNet parts (``layers_up``, ``final_*``, ``patch_embed``,
      ``layers.3``) are dropped; VSS block names renamed (``ln_1`` -> ``norm``,
      ``self_attention`` -> ``op``). HLAEM is absent there (it was never a registered module).
    - VMamba v0 ImageNet (``vmamba_small_e238_ema.pth``) or VM-UNet: ``layers.0-2`` go to
      ``All2Cross.pyramid.vmunet.layers.0-2`` (block names renamed); everything else is dropped.

    Returns the mapped dict and the source (``"mssmamba"`` or ``"vmamba"``).
    """
    sd = tensors_of(state_dict)
    if any(k.startswith(("All2Cross.", "ConvUp_")) for k in sd):
        return remap_vmamba_v0_keys({k: v for k, v in sd.items() if not _DROP.match(k)}), "mssmamba"
    keys = {k: v for k, v in sd.items() if re.match(r"^layers\.[0-2]\.", k)}
    if not keys:
        raise ValueError("checkpoint is neither an MSSMamba nor a VMamba v0 / VM-UNet checkpoint "
                         "(no All2Cross.*, ConvUp_* or layers.0-2.* keys)")
    return remap_vmamba_v0_keys({"All2Cross.pyramid.vmunet." + k: v for k, v in keys.items()}), "vmamba"


def load_pretrained(model: MSSMamba, path: str, strict: bool | None = None) -> dict:
    """Load an MSSMamba or VMamba v0 checkpoint into ``model`` (``torch.load(weights_only=True)``).

    Tensors whose shape differs (another class count, another ``img_size``'s position embeddings)
    are skipped and reported. ``strict`` (default: True for MSSMamba checkpoints, except for the
    HLAEM weights they cannot hold) raises on missing or unexpected keys.
    Returns ``source``, ``loaded``, ``missing``, ``unexpected``, ``shape_mismatch``.
    """
    mapped, source = checkpoint_filter_fn(read_state_dict(path))
    own = model.state_dict()
    if source == "mssmamba":
        expected = [k for k in own if not k.startswith("hlaem.")]
    else:
        expected = [k for k in own if k.startswith("All2Cross.pyramid.vmunet.")]
    return load_mapped(model, mapped, source, expected, (source == "mssmamba") if strict is None else strict, path)
