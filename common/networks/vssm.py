"""VMamba v0 stages as VM-UNet and Mamba-UNet use them (channels-last).

A :class:`VSSLayer` is ``depth`` VSS blocks (no MLP branch; SS2D with the z gate, d_state 16,
ssm_ratio 2) followed by an optional :class:`PatchMerging2D`. :class:`VSSMEncoder` is VM-UNet's
encoder: 4x4 patch embedding, then the layers, returning the map entering each layer (the skips)
and the final output. Parameters are VMamba's except that the blocks call their parts
``norm`` / ``op`` where VM-UNet's checkpoints say ``ln_1`` / ``self_attention``
(:func:`remap_vmamba_v0_keys` renames).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from .blocks import PatchEmbed2D, PatchMerging2D, VSSBlock

__all__ = ["VSSLayer", "VSSMEncoder", "remap_vmamba_v0_keys", "init_vmamba_v0_weights"]


def init_vmamba_v0_weights(module: nn.Module) -> None:
    """VMamba v0's ``_init_weights``: truncated-normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VSSLayer(nn.Module):
    """``depth`` channels-last VSS blocks, then (optionally) 2x2 patch merging to ``2 * dim`` channels.

    Args:
        dim: channels.
        depth: VSS blocks.
        drop_path: stochastic depth per block (a sequence of ``depth``) or one value for all.
        d_state: SSM state size.
        ssm_ratio: SS2D expansion (VMamba v0: 2).
        attn_drop: dropout inside SS2D (after its output projection).
        norm_eps: LayerNorm epsilon of the blocks.
        downsample: end with :class:`PatchMerging2D`.
        use_checkpoint: gradient checkpointing per block.
        scan_backend: selective-scan backend.
    """

    def __init__(self, dim: int, depth: int, drop_path: Sequence[float] | float = 0.0, d_state: int = 16,
                 ssm_ratio: float = 2.0, attn_drop: float = 0.0, norm_eps: float = 1e-5, downsample: bool = False,
                 use_checkpoint: bool = False, scan_backend: str | None = None) -> None:
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, Sequence) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            VSSBlock(dim, drop_path=rates[i], norm_eps=norm_eps, ssm_d_state=d_state, ssm_ratio=ssm_ratio,
                     ssm_drop_rate=attn_drop, mlp_ratio=0.0, use_checkpoint=use_checkpoint, scan_backend=scan_backend)
            for i in range(depth)
        )
        self.downsample = PatchMerging2D(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class VSSMEncoder(nn.Module):
    """VM-UNet / Mamba-UNet encoder: patch embed (4x4), then VSS layers with patch merging.

    ``forward`` takes ``(B, C, H, W)`` and returns ``[x_0, ..., x_{n-1}], x_out`` where ``x_i`` is
    the channels-last map entering layer ``i`` (the skip connections) and ``x_out`` the last output.
    """

    def __init__(self, in_channels: int = 3, patch_size: int = 4, depths: Sequence[int] = (2, 2, 9, 2),
                 dims: Sequence[int] = (96, 192, 384, 768), d_state: int = 16, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, norm_eps: float = 1e-5,
                 use_checkpoint: bool = False, scan_backend: str | None = None) -> None:
        super().__init__()
        self.dims = tuple(dims)
        self.patch_embed = PatchEmbed2D(patch_size, in_channels, dims[0])
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList(
            VSSLayer(dims[i], depths[i], dpr[sum(depths[:i]) : sum(depths[: i + 1])], d_state=d_state,
                     attn_drop=attn_drop_rate, norm_eps=norm_eps, downsample=i < len(depths) - 1,
                     use_checkpoint=use_checkpoint, scan_backend=scan_backend)
            for i in range(len(depths))
        )
        init_vmamba_v0_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.pos_drop(self.patch_embed(x))
        skips = []
        for layer in self.layers:
            skips.append(x)
            x = layer(x)
        return skips, x


def remap_vmamba_v0_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VMamba v0 / VM-UNet / Mamba-UNet block names -> ours (``ln_1`` -> ``norm``, ``self_attention`` -> ``op``)."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"\.ln_1\.", ".norm.", k)
        k = k.replace(".self_attention.", ".op.")
        out[k] = v
    return out
