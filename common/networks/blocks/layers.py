"""Small layers shared by the VMamba-family networks.

Layouts: "channels-last" tensors are ``(B, H, W, C)`` (VMamba v1, VM-UNet, Mamba-UNet),
"channel-first" tensors ``(B, C, H, W)`` (VMamba v2 with ``ln2d``, MSVM-UNet).
Parameter names and shapes follow VMamba's so that original checkpoints map onto these modules
with renames only.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath as _MonaiDropPath
from torch import nn

from ...ops.layer_norm import channel_norm_available, layer_norm_channels, norm_scope
from ...ops.ss2d_io import fused_io_available, layer_norm_cast

__all__ = [
    "DropPath",
    "InputDtypeLayerNorm",
    "layer_norms_in_input_dtype",
    "fuse_conv_bn_for_inference",
    "fuse_conv_relu_for_inference",
    "Conv2dReLU",
    "folded_state_dict",
    "FoldedBatchNorm2d",
    "LayerNorm2d",
    "Linear2d",
    "Mlp",
    "PatchEmbed2D",
    "PatchMerging2D",
    "PatchExpand2D",
    "to_channels_last",
    "to_channels_first",
    "norm_before_linear",
]


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C)."""
    return x.permute(0, 2, 3, 1)


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W)."""
    return x.permute(0, 3, 1, 2)


class DropPath(_MonaiDropPath):
    """MONAI's stochastic depth (same arguments, same distribution), written so that ``torch.compile``
    does not specialise on the probability.

    The keep probability is a (non-persistent) buffer and the per-sample mask ``rand < keep_prob``:
    under ``torch.compile`` a probability held as a Python float (or given to ``bernoulli_``) is baked
    into the graph, so every block of a network (stochastic depth rises linearly through them) would
    compile its own graph; as a tensor it is a graph input, and blocks of the same shape share one
    (:func:`common.networks.compile_blocks`). Setting ``drop_prob`` updates the buffer.
    """

    @property
    def drop_prob(self) -> float:
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self._drop_prob = float(value)
        # flags, not the value, are what compiled graphs guard on
        self.active, self.all_dropped = self._drop_prob > 0.0, self._drop_prob >= 1.0
        if "keep_prob" in self._buffers:
            self.keep_prob.fill_(1.0 - self._drop_prob)
        else:
            self.register_buffer("keep_prob", torch.tensor(1.0 - self._drop_prob), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.active and self.training):
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = (torch.rand(shape, device=x.device) < self.keep_prob).to(x.dtype)
        if self.scale_by_keep and not self.all_dropped:
            mask = mask / self.keep_prob.to(x.dtype)
        return x * mask


class InputDtypeLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that, under autocast, normalises in the input's dtype (bf16 / fp16 in and out;
    PyTorch's kernel keeps the statistics in float32) instead of autocast's float32 in and out, which
    costs a float32 norm and two casts per call. Outside autocast, or on float32 input, it is
    ``nn.LayerNorm``. Same parameters and state dict; the output moves by the low dtype's rounding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            w = self.weight.to(x.dtype) if self.weight is not None else None
            b = self.bias.to(x.dtype) if self.bias is not None else None
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def norm_before_linear(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` where a convolution or linear layer reads the result next.

    Under autocast an ``nn.LayerNorm`` (or :class:`LayerNorm2d`) gives float32 and the layer after it
    casts that to the autocast dtype. On CUDA this can run as one kernel giving the cast result
    directly, the values the layer computes with:

    - with :data:`common.ops.layer_norm.SCOPE` ``"all"``: :func:`common.ops.layer_norm.layer_norm_channels`
      for both norms, differentiable (in training the same gradients: the layer's input gradient is
      in the autocast dtype either way), without the float32 tensor and the cast;
    - by default (``"linear_inference"``): an ``nn.LayerNorm`` of a float32 ``x`` where no gradient is
      needed, through :func:`common.ops.ss2d_io.layer_norm_cast` (the kernel timed on the H200).

    Otherwise (no autocast, CPU, other norms, scope ``"off"``) it is ``norm(x)``.
    """
    kind = type(norm)
    if (kind not in (nn.LayerNorm, LayerNorm2d) or len(norm.normalized_shape) != 1
            or not torch.is_autocast_enabled(x.device.type)):
        return norm(x)
    dtype = torch.get_autocast_dtype(x.device.type)
    scope = norm_scope()
    if scope == "all":
        if not channel_norm_available(x.device):
            return norm(x)
        return layer_norm_channels(x, norm.weight, norm.bias, norm.eps, 1 if kind is LayerNorm2d else -1, dtype)
    if scope == "off" or kind is not nn.LayerNorm or x.dtype != torch.float32:
        return norm(x)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in norm.parameters())):
        return norm(x)
    if not fused_io_available(x.device):
        return norm(x)
    return layer_norm_cast(x, norm.weight, norm.bias, norm.eps, dtype)


def layer_norms_in_input_dtype(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Every plain ``nn.LayerNorm`` inside ``module`` replaced, in place, by an
    :class:`InputDtypeLayerNorm` sharing its parameters (subclasses such as :class:`LayerNorm2d` are
    kept); returns ``module``. For inference under autocast (the bundles' ``amp_input_dtype_norms``):
    H200, graphed bf16 slice, MSSMamba 6.74 -> 6.56 ms, Mamba-HUNet 2.94 -> 2.72 ms
    (benchmarks/README.md). ``enabled=False`` returns ``module`` untouched.
    """
    if not enabled:
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                new = InputDtypeLayerNorm(child.normalized_shape, child.eps, child.elementwise_affine,
                                          bias=child.bias is not None, device="meta")
                new.weight, new.bias = child.weight, child.bias
                new.train(child.training)
                setattr(parent, name, new)
    return module


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (type(conv) in (nn.Conv2d, nn.ConvTranspose2d) and type(norm) is nn.BatchNorm2d
            and norm.running_mean is not None and conv.out_channels == norm.num_features)


class FoldedBatchNorm2d(nn.Identity):
    """Where a ``BatchNorm2d`` was, once :func:`fuse_conv_bn_for_inference` folded it into the
    convolution before it: passes its input through in eval mode, and refuses to train (the
    statistics and affine parameters are gone, so a training step would silently drop the norm)."""

    def __init__(self, num_features: int, eps: float) -> None:
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("this BatchNorm2d was folded into the convolution before it for inference "
                               "(fuse_conv_bn_for_inference); build the network again to train it")
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, folded"


def _fold_pairs_state(pairs: list, state_dict: dict, prefix: str) -> None:
    """Rewrite, in place, the entries of ``state_dict`` (keys under ``prefix``) of each unfolded
    ``(conv path, norm path, eps, transposed)`` pair into the folded convolution's weight and bias."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    for a, b, eps, transpose in pairs:
        conv, norm = prefix + a + ".", prefix + b + "."
        if norm + "running_mean" not in state_dict or conv + "weight" not in state_dict:
            continue  # folded already, or a key is missing (strict loading reports it)
        with torch.no_grad():
            weight, bias = fuse_conv_bn_weights(
                state_dict[conv + "weight"], state_dict.get(conv + "bias"), state_dict.pop(norm + "running_mean"),
                state_dict.pop(norm + "running_var"), eps, state_dict.pop(norm + "weight", None),
                state_dict.pop(norm + "bias", None), transpose)
        state_dict.pop(norm + "num_batches_tracked", None)
        state_dict[conv + "weight"], state_dict[conv + "bias"] = weight.detach(), bias.detach()


def folded_state_dict(module: nn.Module, state_dict: dict) -> dict:
    """``state_dict`` (of ``module`` before :func:`fuse_conv_bn_for_inference`) as ``module`` holds it
    after folding: each folded pair's convolution weight and bias computed from the checkpoint's
    convolution and batch norm, the norm's entries dropped. A copy (``state_dict`` itself where
    nothing is folded); entries already folded, and those of modules without folded pairs, are kept
    as they are. ``module.load_state_dict`` does this
    by itself (a load hook); this is for code that compares keys first."""
    from ..graphs import CUDAGraphInference

    while isinstance(module, (CUDAGraphInference, nn.DataParallel, nn.parallel.DistributedDataParallel)):
        module = module.module  # wrappers whose state dict is their module's (DDP's: loaded into .module)
    folds = [(name, sub._folded_conv_bn_pairs) for name, sub in module.named_modules()
             if getattr(sub, "_folded_conv_bn_pairs", None)]
    if not folds:
        return state_dict
    out = OrderedDict(state_dict)
    if hasattr(state_dict, "_metadata"):
        out._metadata = state_dict._metadata  # per-module versions, which load_state_dict reads
    for name, pairs in folds:
        _fold_pairs_state(pairs, out, name + "." if name else "")
    return out


def _fold_on_load(module, state_dict, prefix, *args) -> None:
    _fold_pairs_state(module._folded_conv_bn_pairs, state_dict, prefix)


def fuse_conv_bn_for_inference(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` / ``ConvTranspose2d``
    into that convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``), in place; returns ``module``.

    Pairs are adjacent children of an ``nn.Sequential``, plus those a module names in a
    ``conv_bn_pairs`` attribute (dotted paths below it, e.g. a ResNet bottleneck's ``conv1`` /
    ``bn1``); the norm becomes a :class:`FoldedBatchNorm2d` (identity in eval mode). Same function up
    to float rounding, fewer kernels (a batch norm in eval mode is two).

    For inference only: the module must be in eval mode, and a folded norm raises if run in training
    mode. Checkpoints of the unfolded network still load: ``load_state_dict`` folds their
    convolution and norm entries on the way in (a load hook on each pair's parent, writing into the
    same parameters, so CUDA graphs captured before stay valid), and :func:`folded_state_dict` does
    the same for code that compares keys first. ``module.state_dict()`` gives the folded tensors,
    which load only into a folded network. ``enabled=False`` returns ``module`` untouched.
    """
    if not enabled:
        return module
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if module.training:
        raise ValueError("fuse_conv_bn_for_inference: the module is in training mode; call .eval() first "
                         "(the folded batch norms use their running statistics)")
    pairs = []
    for parent in module.modules():
        if isinstance(parent, nn.Sequential):
            kids = list(parent.named_children())
            pairs += [(parent, a, b) for (a, _), (b, _) in zip(kids, kids[1:])]
        pairs += [(parent, a, b) for a, b in getattr(parent, "conv_bn_pairs", ())]
    folded = 0
    for parent, a, b in pairs:
        conv, norm = parent.get_submodule(a), parent.get_submodule(b)
        if not _foldable(conv, norm):
            continue
        transpose = type(conv) is nn.ConvTranspose2d
        fused = fuse_conv_bn_eval(conv, norm, transpose=transpose)
        parent.set_submodule(a, fused)
        parent.set_submodule(b, FoldedBatchNorm2d(norm.num_features, norm.eps).eval())
        if "_folded_conv_bn_pairs" not in parent.__dict__:
            parent._folded_conv_bn_pairs = []
            parent.register_load_state_dict_pre_hook(_fold_on_load)
        parent._folded_conv_bn_pairs.append((a, b, norm.eps, transpose))
        folded += 1
    module.folded_conv_bn = getattr(module, "folded_conv_bn", 0) + folded
    return module


class Conv2dReLU(nn.Conv2d):
    """``relu(conv(x))`` where a ``Conv2d`` was followed by a ReLU, made by :func:`fuse_conv_relu_for_inference`.

    On CUDA without autograd it is one cuDNN call (``torch.cudnn_convolution_relu``: convolution, bias
    and ReLU in one kernel, where PyTorch runs a convolution with a bias as the convolution and a
    separate broadcast add, then the ReLU); under autocast its input, weight and bias are cast to the
    autocast dtype as ``F.conv2d`` would be. Elsewhere (CPU, training, string padding) the convolution
    then ``F.relu``. Same parameters and state-dict keys as the ``Conv2d`` it replaces.
    """

    def _cudnn_fused(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and not torch.is_grad_enabled() and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and torch.backends.cudnn.enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._cudnn_fused(x):
            return F.relu(super().forward(x))
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        return torch.cudnn_convolution_relu(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> Conv2dReLU:
        """A :class:`Conv2dReLU` sharing ``conv``'s parameters (no copy)."""
        fused = cls.__new__(cls)
        fused.__dict__.update(conv.__dict__)
        fused._parameters = dict(conv._parameters)
        fused._buffers = dict(conv._buffers)
        fused._modules = dict(conv._modules)
        return fused


def fuse_conv_relu_for_inference(module: nn.Module, enabled: bool = True, min_kernel_size: int = 3) -> nn.Module:
    """Run each ``Conv2d`` that a ReLU follows (with at most a folded batch norm between) as one
    :class:`Conv2dReLU`, in place; returns ``module``.

    Pairs are a ``Conv2d`` of kernel at least ``min_kernel_size`` (cuDNN's fused call was 2-3 us faster
    at MSSMamba's 3 x 3 convolutions on an H100 and slower at 1 x 1, ``benchmarks/README.md``) followed,
    in an ``nn.Sequential``, by a ``ReLU`` or by a :class:`FoldedBatchNorm2d` and a ``ReLU`` (the ReLU
    becomes an ``nn.Identity``), plus the ``(convolution, norm or None)`` paths a module names in a
    ``conv_relu`` attribute (its forward applies the ReLU itself unless the convolution is a
    :class:`Conv2dReLU`, e.g. a ResNet bottleneck's ``conv2`` / ``bn2``; the norm must be folded). Call it after
    :func:`fuse_conv_bn_for_inference`: an unfolded ``BatchNorm2d`` between a convolution and its ReLU
    keeps the pair apart. For inference (eval mode); ``enabled=False`` returns ``module`` untouched.
    """
    if not enabled:
        return module
    if module.training:
        raise ValueError("fuse_conv_relu_for_inference: the module is in training mode; call .eval() first")

    def fusable(conv: nn.Module) -> bool:
        return type(conv) is nn.Conv2d and min(conv.kernel_size) >= min_kernel_size

    fused = 0
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            kids = list(parent.named_children())
            for i, (name, conv) in enumerate(kids):
                rest = [m for _, m in kids[i + 1 : i + 3]]
                if rest and isinstance(rest[0], FoldedBatchNorm2d):
                    rest = rest[1:]
                    relu_at = i + 2
                else:
                    relu_at = i + 1
                if fusable(conv) and rest and type(rest[0]) is nn.ReLU:
                    setattr(parent, name, Conv2dReLU.from_conv(conv))
                    setattr(parent, kids[relu_at][0], nn.Identity())
                    fused += 1
        for name, norm in getattr(parent, "conv_relu", ()):
            conv = parent.get_submodule(name)
            if fusable(conv) and (norm is None or isinstance(parent.get_submodule(norm), FoldedBatchNorm2d)):
                parent.set_submodule(name, Conv2dReLU.from_conv(conv))
                fused += 1
    module.fused_conv_relu = getattr(module, "fused_conv_relu", 0) + fused
    return module


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channel-first ``(B, C, H, W)`` tensor (VMamba's ``ln2d``).

    Where :func:`common.ops.layer_norm.channel_norm_available` (CUDA, scope ``"all"``) one kernel each way in
    the input's layout (:func:`common.ops.layer_norm.layer_norm_channels`); else a channels-last view,
    ``F.layer_norm`` and the channel-first view back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if channel_norm_available(x.device) and len(self.normalized_shape) == 1:
            return layer_norm_channels(x, self.weight, self.bias, self.eps, 1)
        x = F.layer_norm(to_channels_last(x), self.normalized_shape, self.weight, self.bias, self.eps)
        return to_channels_first(x)


class Linear2d(nn.Linear):
    """A 1x1 convolution stored as an ``nn.Linear`` (weight ``(out, in)``), for channel-first maps.

    Keeping the linear layout means channels-last and channel-first variants share checkpoints.

    A CPU map in channels-last memory goes through ``F.linear`` on its ``(B, H, W, C)`` view (no
    copy, one GEMM): PyTorch's CPU convolution runs 1x1 kernels single-threaded at batch < 16 on a
    per-sample fallback that is up to 6x slower forward + backward (MSVM-UNet's fc1, 96 -> 384 at
    24 x 24, batch 8: 117 -> 19 ms). The output keeps the channels-last layout. CUDA maps and
    contiguous ones use the convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dim() == 4:  # accept a Conv2d 1x1 checkpoint
            state_dict[key] = state_dict[key].flatten(1)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Mlp(nn.Module):
    """Two-layer feed-forward network ``fc1 -> act -> drop -> fc2 -> drop``.

    Args:
        in_features: input channels.
        hidden_features: hidden channels (default ``in_features``).
        out_features: output channels (default ``in_features``).
        act_layer: activation class.
        drop: dropout probability.
        channel_first: operate on ``(B, C, H, W)`` with 1x1 convolutions instead of channels-last.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        channel_first: bool = False,
    ) -> None:
        super().__init__()
        linear = Linear2d if channel_first else nn.Linear
        hidden_features = hidden_features or in_features
        self.fc1 = linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed2D(nn.Module):
    """Non-overlapping patch embedding: ``Conv2d(k=s=patch_size)`` then LayerNorm, channels-last out.

    VMamba v1 / VM-UNet / Mamba-UNet use it with ``patch_size=4`` (``(B, C, H, W)`` in,
    ``(B, H/4, W/4, embed_dim)`` out).
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_channels_last(self.proj(x)))


class PatchMerging2D(nn.Module):
    """Swin/VMamba patch merging (channels-last): 2x2 neighbours concatenated, LayerNorm, linear.

    ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), out_dim)`` (``out_dim`` defaults to ``2C``); odd
    sizes are zero-padded. The neighbour order (0,0), (1,0), (0,1), (1,1) is Swin's, which the
    pretrained checkpoints assume.
    """

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(norm_before_linear(self.norm, x))


class PatchExpand2D(nn.Module):
    """Patch expanding (channels-last): linear to ``scale**2 * out_dim``, pixel-shuffle, LayerNorm.

    ``(B, H, W, dim)`` -> ``(B, scale*H, scale*W, out_dim)``. With ``scale=2, out_dim=dim//2`` it
    is Swin-UNet / Mamba-UNet's ``PatchExpand``; with ``scale=4, out_dim=dim`` their final x4
    expansion. The channel order inside the linear output is ``(p1, p2, c)`` as in those codes.
    """

    def __init__(self, dim: int, scale: int = 2, out_dim: int | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim or dim // scale
        self.expand = nn.Linear(dim, scale * scale * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s, c = self.scale, self.out_dim
        x = self.expand(x).view(b, h, w, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c)
        return self.norm(x)
