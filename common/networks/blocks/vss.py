"""VSS block: the residual unit of VMamba-family networks.

``x = x + drop_path(SS2D(norm(x)))`` then, when ``mlp_ratio > 0``,
``x = x + drop_path(MLP(norm2(x)))`` (VMamba v2). With ``mlp_ratio=0`` it is the VMamba v0 /
VM-UNet / Mamba-UNet block (``ln_1`` + ``self_attention`` there; ``norm`` + ``op`` here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

from ..compile import Compilable, maybe_compiled
from .layers import DropPath, LayerNorm2d, Mlp, norm_before_linear
from .ss2d import SS2D

__all__ = ["VSSBlock"]


class VSSBlock(Compilable, nn.Module):
    """Visual state-space block.

    Args:
        hidden_dim: channels.
        drop_path: stochastic-depth probability of both residual branches.
        channel_first: ``(B, C, H, W)`` tensors (LayerNorm2d, 1x1 convs) instead of ``(B, H, W, C)``.
        norm_eps: LayerNorm epsilon (VMamba 1e-5, Mamba-UNet / VM-UNet 1e-6).
        ssm_d_state, ssm_ratio, ssm_dt_rank, ssm_conv, ssm_conv_bias, ssm_with_z, ssm_init,
            ssm_drop_rate: forwarded to :class:`SS2D` (``d_state``, ``ssm_ratio``, ``dt_rank``,
            ``d_conv``, ``conv_bias``, ``with_z``, ``initialize``, ``dropout``).
        mlp_ratio: hidden width of the MLP branch relative to ``hidden_dim``; 0 disables it.
        mlp_drop_rate: dropout inside the MLP.
        mlp_layer: MLP class, called as ``mlp_layer(in_features=, hidden_features=, drop=,
            channel_first=)`` (default :class:`Mlp` with GELU).
        post_norm: normalise after the branch instead of before (VMamba option).
        use_checkpoint: gradient checkpointing of the whole block (saves memory when training).
        scan_backend: selective-scan backend for the SS2D (``None``: automatic).
    """

    def __init__(
        self,
        hidden_dim: int,
        drop_path: float = 0.0,
        channel_first: bool = False,
        norm_eps: float = 1e-5,
        ssm_d_state: int = 16,
        ssm_ratio: float = 2.0,
        ssm_dt_rank: int | str = "auto",
        ssm_conv: int = 3,
        ssm_conv_bias: bool = True,
        ssm_with_z: bool = True,
        ssm_init: str = "v0",
        ssm_drop_rate: float = 0.0,
        mlp_ratio: float = 0.0,
        mlp_drop_rate: float = 0.0,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        post_norm: bool = False,
        use_checkpoint: bool = False,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        norm = LayerNorm2d if channel_first else nn.LayerNorm
        self.post_norm, self.use_checkpoint = post_norm, use_checkpoint
        self.norm = norm(hidden_dim, eps=norm_eps)
        self.op = SS2D(
            d_model=hidden_dim,
            d_state=ssm_d_state,
            ssm_ratio=ssm_ratio,
            dt_rank=ssm_dt_rank,
            d_conv=ssm_conv,
            conv_bias=ssm_conv_bias,
            with_z=ssm_with_z,
            initialize=ssm_init,
            dropout=ssm_drop_rate,
            channel_first=channel_first,
            scan_backend=scan_backend,
        )
        self.drop_path = DropPath(drop_path)
        self.mlp = None
        if mlp_ratio > 0:
            self.norm2 = norm(hidden_dim, eps=norm_eps)
            self.mlp = mlp_layer(
                in_features=hidden_dim,
                hidden_features=int(hidden_dim * mlp_ratio),
                drop=mlp_drop_rate,
                channel_first=channel_first,
            )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = x + self.drop_path(self.norm(self.op(x)))
            if self.mlp is not None:
                x = x + self.drop_path(self.norm2(self.mlp(x)))
        else:
            # SS2D starts with in_proj (an nn.Linear or a 1x1 conv), which reads the norm in its autocast dtype
            x = x + self.drop_path(self.op(norm_before_linear(self.norm, x)))
            if self.mlp is not None:
                # Mlp (and MS-FFN) start with fc1, which casts the norm to the autocast dtype
                h = norm_before_linear(self.norm2, x) if isinstance(self.mlp, Mlp) else self.norm2(x)
                x = x + self.drop_path(self.mlp(h))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return maybe_compiled(self, VSSBlock._forward, x)  # compiled after common.networks.compile_blocks
