"""Mamba-HUNet (Sanjid, Hossain, Junayed, Uddin, "Integrating Mamba Sequence Model and Hierarchical
Upsampling Network for Accurate Semantic Segmentation of Multiple Sclerosis Legion", arXiv 2403.17432).

No code of Mamba-HUNet is public. The paper states: grey-scale 256 x 256 slices are split into
patches and linearly embedded (no position embedding); VSS blocks and patch merging build
hierarchical features with a skip connection at every level; the decoder mirrors the encoder with
patch-expanding layers and VSS blocks, and its upsampling blocks are those of a "light" HUNet
(extra convolutional and transposed-convolutional layers inside the upsampling block, batch
normalisation and dropout; fewer parameters, adjusted dropout and simpler convolutions than
HUNet); a final convolution gives the class scores. Everything else is a choice made here,
following Mamba-UNet's public code (ziyangwang007/Mamba-UNet, ``code/networks/mamba_sys.py`` and
``vision_mamba.py``, arXiv 2402.05079) for the skeleton. The choices, with their sources (also in
``mambahunet_ms/docs/network.md``):

Encoder (Mamba-UNet's ``VSSM`` encoder, :class:`common.networks.vssm.VSSMEncoder`):

- 4 x 4 patch embedding (``Conv2d(k=s=4)`` + LayerNorm) to ``embed_dim = 96``; stages of widths
  96, 192, 384, 768 at 1/4 ... 1/32 of the input; depths (2, 2, 2, 2) (Mamba-UNet's
  ``configs/vmamba_tiny.yaml``); VMamba v0 VSS blocks (no MLP branch; SS2D with the z gate,
  ``d_state = 16``, ``ssm_ratio = 2``, depth-wise 3 x 3 conv with bias, LayerNorm eps 1e-5 since
  Mamba-UNet's ``VSSM`` hands ``nn.LayerNorm`` to its blocks); Swin patch merging between stages;
  stochastic depth linear from 0 to ``drop_path_rate = 0.2`` (``vmamba_tiny.yaml``, the file
  Mamba-UNet's training script loads; ``config.py``'s default would be 0.1); a LayerNorm on the
  bottleneck (Mamba-UNet's ``norm``).
- Skips: the maps entering stages 0 .. n-2 (96 @ 1/4, 192 @ 1/8, 384 @ 1/16), as Mamba-UNet.
- Grey input: the patch embedding takes ``in_channels`` (1) directly. Mamba-UNet repeats a grey
  slice to 3 channels instead; :func:`checkpoint_filter_fn` sums a 3-channel pretrained kernel over
  its input channels, which is exactly that repetition, so pretrained encoders still apply.

Decoder (Mamba-UNet's ``layers_up`` with light HUNet upsampling blocks):

- At each of the n-1 levels, deepest first: :class:`LightHUNetUp` (x2, width halved), concatenation
  with the skip, Mamba-UNet's ``concat_back_dim`` linear (2C -> C), then ``depths_decoder[level]``
  VSS blocks (default: the encoder's depths, mirrored; stochastic depth as Mamba-UNet gives them:
  the rates of the mirrored encoder stage). Then Mamba-UNet's ``norm_up`` LayerNorm.
- :class:`LightHUNetUp` is two pathways summed, then a refinement: the patch-expanding pathway
  (Mamba-UNet's ``PatchExpand``: linear to 4 x C/2, pixel shuffle, LayerNorm) and a convolutional
  pathway (``ConvTranspose2d(k=2, s=2)``, BatchNorm, ReLU); their sum goes through
  ``Conv2d(3x3)``, BatchNorm, ReLU and dropout (``dropout = 0.1``). The HUNet paper's text was not
  available; the two pathways are our reading of its "dual-pathway ... hierarchical upsampling" and
  of the Mamba-HUNet paper's "patch-expanding layers" with "convolutional and transposed-
  convolutional layers inside the upsampling block". "Light": one transposed conv and one 3 x 3
  conv per block, no bias before BatchNorm.
- Final x4 expansion, hierarchical: two more :class:`LightHUNetUp` blocks (96 -> 48 @ 1/2,
  48 -> 24 @ 1/1) in place of Mamba-UNet's single ``FinalPatchExpand_X4`` (which keeps 96
  channels at full resolution), then the final ``Conv2d(1x1)`` to ``num_classes`` (with bias).

Initialisation: Mamba-UNet's (VMamba v0 ``_init_weights``: truncated-normal linear weights, zero
biases, unit LayerNorms); convolutions and BatchNorm keep PyTorch's defaults (Mamba-UNet leaves
its convolutions at the defaults too).

Layouts: the VSS parts are channels-last ``(B, H, W, C)`` like Mamba-UNet; the network's input and
output are channels-first ``(B, C, H, W)`` like MONAI networks. Input H and W must be multiples of
``4 * 2 ** (len(depths) - 1)`` (32 for 4 stages); the output is ``(B, num_classes, H, W)`` logits.

Checkpoints: :func:`checkpoint_filter_fn` maps a Mamba-HUNet checkpoint (names as here), a trained
Mamba-UNet checkpoint (``mamba_unet.*`` or bare ``VSSM`` keys) and a VMamba v0 ImageNet checkpoint
(``vmamba_tiny_e292.pth``, which Mamba-UNet's ``load_from`` loads into its encoder *and* its
decoder VSS blocks; the same is done here); :func:`load_pretrained` reads a file with
``weights_only=True`` and reports what loaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from .blocks import PatchExpand2D, to_channels_first, to_channels_last
from .checkpoint import load_mapped, read_state_dict, tensors_of
from .vssm import VSSLayer, VSSMEncoder, init_vmamba_v0_weights, remap_vmamba_v0_keys

__all__ = [
    "MambaHUNet",
    "LightHUNetUp",
    "MambaHUNetDecoder",
    "mambahunet",
    "checkpoint_filter_fn",
    "load_pretrained",
]


class LightHUNetUp(nn.Module):
    """Light HUNet upsampling block: x2, ``in_dim -> out_dim`` channels, channels-last in and out.

    ``y = PatchExpand(x) + ReLU(BN(ConvTranspose2d_k2s2(x)))`` then
    ``Dropout(ReLU(BN(Conv2d_3x3(y))))``.

    Args:
        in_dim: input channels.
        out_dim: output channels (default ``in_dim // 2``, as Mamba-UNet's patch expanding).
        dropout: dropout probability after the refinement convolution (element-wise, as MONAI's
            ``ADN`` with ``dropout_dim=1``).
    """

    def __init__(self, in_dim: int, out_dim: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        out_dim = out_dim or in_dim // 2
        self.in_dim, self.out_dim = in_dim, out_dim
        # token pathway: Mamba-UNet's PatchExpand (keys expand.expand / expand.norm)
        self.expand = PatchExpand2D(in_dim, scale=2, out_dim=out_dim)
        # convolutional pathway: learned x2 upsampling
        self.transposed = nn.Sequential(
            nn.ConvTranspose2d(in_dim, out_dim, kernel_size=2, stride=2, bias=False),
            nn.BatchNorm2d(out_dim),
            nn.ReLU(inplace=True),
        )
        self.refine = nn.Sequential(
            nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, in_dim)`` -> ``(B, 2H, 2W, out_dim)``."""
        y = to_channels_first(self.expand(x)) + self.transposed(to_channels_first(x))
        return to_channels_last(self.refine(y))


class MambaHUNetDecoder(nn.Module):
    """Mamba-UNet's decoder with :class:`LightHUNetUp` upsampling, then the hierarchical x4 head.

    Args:
        dims: encoder widths, shallow first (``(96, 192, 384, 768)``).
        num_classes: output channels.
        depths: VSS blocks of the decoder stage at each level ``0 .. len(dims) - 2`` (shallow first,
            the level's width is ``dims[level]``).
        drop_path: stochastic-depth rates per level (a sequence per level).
        dropout: dropout of the light HUNet blocks.
        d_state: SSM state size of the VSS blocks.
        use_checkpoint: gradient checkpointing of the VSS blocks.
        scan_backend: selective-scan backend.
    """

    def __init__(self, dims: Sequence[int], num_classes: int, depths: Sequence[int],
                 drop_path: Sequence[Sequence[float]], dropout: float = 0.1, d_state: int = 16,
                 use_checkpoint: bool = False, scan_backend: str | None = None) -> None:
        super().__init__()
        levels = list(range(len(dims) - 2, -1, -1))  # deepest decoder level first
        self.ups = nn.ModuleList(LightHUNetUp(dims[lv + 1], dims[lv], dropout) for lv in levels)
        self.concat_back_dim = nn.ModuleList(nn.Linear(2 * dims[lv], dims[lv]) for lv in levels)
        self.layers_up = nn.ModuleList(
            VSSLayer(dims[lv], depths[lv], list(drop_path[lv]), d_state=d_state, use_checkpoint=use_checkpoint,
                     scan_backend=scan_backend)
            for lv in levels
        )
        self.norm_up = nn.LayerNorm(dims[0])
        # final x4 expansion in two light HUNet steps, then the class convolution
        self.final_up = nn.ModuleList([LightHUNetUp(dims[0], dims[0] // 2, dropout),
                                       LightHUNetUp(dims[0] // 2, dims[0] // 4, dropout)])
        self.final_conv = nn.Conv2d(dims[0] // 4, num_classes, kernel_size=1)
        init_vmamba_v0_weights(self)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x``: channels-last bottleneck; ``skips``: channels-last maps, shallow first. Returns logits."""
        for up, concat, layer, skip in zip(self.ups, self.concat_back_dim, self.layers_up, skips[-2::-1]):
            x = layer(concat(torch.cat([up(x), skip], dim=-1)))
        x = self.norm_up(x)
        for up in self.final_up:
            x = up(x)
        return self.final_conv(to_channels_first(x))


class MambaHUNet(nn.Module):
    """Mamba-HUNet: Mamba-UNet's VSS encoder and a decoder of VSS blocks with light HUNet upsampling.

    Args:
        in_channels: input channels (1: a grey FLAIR slice).
        num_classes: output channels (logits), background included (2: background + lesion).
        embed_dim: width of the patch embedding; stage ``i`` has ``embed_dim * 2**i`` channels.
        depths: VSS blocks of each encoder stage (Mamba-UNet: ``(2, 2, 2, 2)``).
        depths_decoder: VSS blocks of the decoder stage at each level ``0 .. len(depths) - 2``
            (shallow first, like ``depths``); default ``depths[:-1]`` (Mamba-UNet's mirror).
        d_state: SSM state size (VMamba v0 / Mamba-UNet: 16).
        drop_path_rate: stochastic depth, linear from 0 over the encoder blocks; each decoder stage
            takes the rates of the encoder stage at its level (Mamba-UNet).
        dropout: dropout in the light HUNet upsampling blocks.
        patch_size: patch embedding size (4).
        scan_backend: selective-scan backend of every SS2D (``None``: automatic; see ``common.ops``).
        use_checkpoint: gradient checkpointing of every VSS block (less memory, slower).

    Input ``(B, in_channels, H, W)`` with H and W multiples of ``patch_size * 2**(len(depths) - 1)``
    (32 by default); output ``(B, num_classes, H, W)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        depths_decoder: Sequence[int] | None = None,
        d_state: int = 16,
        drop_path_rate: float = 0.2,
        dropout: float = 0.1,
        patch_size: int = 4,
        scan_backend: str | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        depths = tuple(int(d) for d in depths)
        if len(depths) < 2:
            raise ValueError(f"MambaHUNet needs at least 2 stages, got depths {depths}")
        depths_decoder = depths[:-1] if depths_decoder is None else tuple(int(d) for d in depths_decoder)
        if len(depths_decoder) != len(depths) - 1:
            raise ValueError(f"MambaHUNet: depths_decoder needs {len(depths) - 1} entries (one per decoder level), "
                             f"got {depths_decoder}")
        if embed_dim % 4:
            raise ValueError(f"MambaHUNet: embed_dim must be a multiple of 4 (the head quarters it), got {embed_dim}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.dims = tuple(embed_dim * 2**i for i in range(len(depths)))
        self.size_divisor = patch_size * 2 ** (len(depths) - 1)
        self.encoder = VSSMEncoder(in_channels, patch_size, depths, self.dims, d_state=d_state,
                                   drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint,
                                   scan_backend=scan_backend)
        self.norm = nn.LayerNorm(self.dims[-1])  # Mamba-UNet's bottleneck norm
        # decoder stochastic depth: the rates of the mirrored encoder stage (linspace over a decoder
        # whose depths differ from the encoder's)
        mirrored = depths_decoder + (depths[-1],)
        dpr = torch.linspace(0, drop_path_rate, sum(mirrored)).tolist()
        dec_rates = [dpr[sum(mirrored[:i]) : sum(mirrored[: i + 1])] for i in range(len(depths_decoder))]
        self.decoder = MambaHUNetDecoder(self.dims, num_classes, depths_decoder, dec_rates, dropout=dropout,
                                         d_state=d_state, use_checkpoint=use_checkpoint, scan_backend=scan_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"MambaHUNet expects (B, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"MambaHUNet built for {self.in_channels} input channel(s), got {x.shape[1]}")
        if x.shape[-2] % self.size_divisor or x.shape[-1] % self.size_divisor:
            raise ValueError(f"MambaHUNet needs H and W divisible by {self.size_divisor}, got {tuple(x.shape[-2:])}")
        skips, x = self.encoder(x)
        return self.decoder(self.norm(x), skips)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Stop (or restart) training the encoder and its bottleneck norm (fine-tuning from ImageNet)."""
        for p in (*self.encoder.parameters(), *self.norm.parameters()):
            p.requires_grad_(not frozen)

    def unfreeze_encoder(self) -> None:
        self.freeze_encoder(False)


def mambahunet(in_channels: int = 1, num_classes: int = 2, **kwargs) -> MambaHUNet:
    """Mamba-HUNet as built for the MS lesion bundle: embed 96, depths (2, 2, 2, 2), d_state 16."""
    return MambaHUNet(in_channels, num_classes, **kwargs)


# --------------------------------------------------------------------------------------------
# Foreign checkpoints
# --------------------------------------------------------------------------------------------


def _fit_patch_embed(sd: dict[str, torch.Tensor], model: MambaHUNet | None) -> dict[str, torch.Tensor]:
    """A 3-channel patch-embedding kernel summed over its input channels for a 1-channel model
    (identical to Mamba-UNet's repetition of a grey slice to 3 channels)."""
    key = "encoder.patch_embed.proj.weight"
    if model is not None and key in sd and model.in_channels == 1 and sd[key].dim() == 4 and sd[key].shape[1] > 1:
        sd[key] = sd[key].sum(dim=1, keepdim=True)
    return sd


def _map_vssm_encoder(k: str) -> str | None:
    """Mamba-UNet / VMamba v0 encoder key -> ours (``None``: not an encoder key)."""
    if k.startswith(("patch_embed.", "layers.")):
        return "encoder." + k
    if k.startswith("norm."):
        return k
    return None


def _map_mamba_unet_decoder(k: str) -> str | None:
    """Mamba-UNet decoder key -> ours (``None``: a part without a counterpart here)."""
    m = re.match(r"^layers_up\.(\d+)\.(.*)$", k)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i == 0:  # the bottleneck PatchExpand
            return f"decoder.ups.0.expand.{rest}" if rest.startswith(("expand.", "norm.")) else None
        if rest.startswith("blocks."):
            return f"decoder.layers_up.{i - 1}.{rest}"
        if rest.startswith("upsample."):
            return f"decoder.ups.{i}.expand.{rest[len('upsample.'):]}"
        return None
    m = re.match(r"^concat_back_dim\.(\d+)\.(.*)$", k)
    if m and int(m.group(1)) > 0:
        return f"decoder.concat_back_dim.{int(m.group(1)) - 1}.{m.group(2)}"
    if k.startswith("norm_up."):
        return "decoder." + k
    return None  # up.* (FinalPatchExpand_X4) and output.* differ from our head


def checkpoint_filter_fn(state_dict: dict, model: MambaHUNet | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Map a foreign checkpoint's keys onto :class:`MambaHUNet`'s (timm's ``checkpoint_filter_fn`` idea).

    Recognises:

    - a Mamba-HUNet checkpoint (``encoder.*`` / ``decoder.*``): names are ours;
    - a trained Mamba-UNet checkpoint (``MambaUnet.state_dict()``: ``mamba_unet.*``; or its ``VSSM``
      alone: ``layers_up.*``, ``concat_back_dim.*``): ``patch_embed`` / ``layers`` -> ``encoder.*``,
      ``norm`` -> ``norm``; ``layers_up.0`` (PatchExpand) and ``layers_up.i.upsample`` -> the
      patch-expanding pathway ``decoder.ups.i.expand``; ``layers_up.i.blocks`` ->
      ``decoder.layers_up.{i-1}.blocks``; ``concat_back_dim.i`` -> ``decoder.concat_back_dim.{i-1}``;
      ``norm_up`` -> ``decoder.norm_up``; its x4 head (``up``, ``output``) is dropped;
    - a VMamba v0 ImageNet checkpoint (``vmamba_tiny_e292.pth``: ``patch_embed.*``, ``layers.*``,
      ``norm.*``, ``head.*``): the encoder as above, and, as Mamba-UNet's ``load_from`` does, each
      ``layers.N.blocks`` also into the decoder stage of the same width; ``head`` is dropped.

    VSS block names ``ln_1`` / ``self_attention`` become ``norm`` / ``op``. With ``model`` given and
    one input channel, a 3-channel patch-embedding kernel is summed over its input channels.
    Returns the mapped dict and the detected source (``"mambahunet"``, ``"mamba_unet"`` or ``"vmamba"``).
    """
    sd = tensors_of(state_dict)
    if any(k.startswith(("encoder.", "decoder.")) for k in sd):
        return _fit_patch_embed(dict(sd), model), "mambahunet"
    if any(k.startswith("mamba_unet.") for k in sd):
        sd = {k[len("mamba_unet."):]: v for k, v in sd.items() if k.startswith("mamba_unet.")}
    if not any(k.startswith(("patch_embed.", "layers.", "layers_up.")) for k in sd):
        raise ValueError("checkpoint is neither a Mamba-HUNet, a Mamba-UNet nor a VMamba v0 checkpoint (no "
                         "encoder.*, decoder.*, mamba_unet.*, patch_embed.*, layers.* or layers_up.* keys)")
    source = "mamba_unet" if any(k.startswith(("layers_up.", "concat_back_dim.")) for k in sd) else "vmamba"
    n_levels = len(model.dims) if model is not None else 1 + max(
        (int(m.group(1)) for k in sd if (m := re.match(r"^layers\.(\d+)\.", k))), default=3)
    out = {}
    for k, v in sd.items():
        new = _map_vssm_encoder(k)
        if new is None and source == "mamba_unet":
            new = _map_mamba_unet_decoder(k)
        if new is not None:
            out[new] = v
        m = re.match(r"^layers\.(\d+)\.(blocks\..*)$", k)
        if source == "vmamba" and m and int(m.group(1)) <= n_levels - 2:
            out[f"decoder.layers_up.{n_levels - 2 - int(m.group(1))}.{m.group(2)}"] = v
    return _fit_patch_embed(remap_vmamba_v0_keys(out), model), source


def load_pretrained(model: MambaHUNet, path: str, strict: bool | None = None) -> dict:
    """Load a Mamba-HUNet, Mamba-UNet or VMamba v0 checkpoint file into ``model``.

    The file is read with ``torch.load(weights_only=True)`` (a pickle that needs code is refused).
    Tensors whose shape differs from the model's (another class count, other depths or widths) are
    skipped and reported. ``strict`` (default: True for Mamba-HUNet checkpoints, False for
    Mamba-UNet and VMamba ones, which cannot fill the HUNet convolutions) raises when expected keys
    are missing or keys are unexpected or reshaped. Expected keys: all for a Mamba-HUNet checkpoint;
    the encoder and bottleneck norm for the others.

    Returns a report: ``source``, ``loaded`` (count), ``missing``, ``unexpected``, ``shape_mismatch``.
    """
    mapped, source = checkpoint_filter_fn(read_state_dict(path), model)
    own = model.state_dict()
    expected = list(own) if source == "mambahunet" else [k for k in own if k.startswith(("encoder.", "norm."))]
    return load_mapped(model, mapped, source, expected, (source == "mambahunet") if strict is None else strict, path)
