"""SS2D: VMamba's 2D selective-scan block (Liu et al., "VMamba: Visual State Space Model").

One module covers the variants the three networks use:

- VMamba v0 / VM-UNet / Mamba-UNet: channels-last, ``d_state=16``, ``ssm_ratio=2``, z gate,
  depth-wise 3x3 conv with bias.
- VMamba v2 ``v05_noz`` (VMamba-Tiny 0230s, MSVM-UNet): channel-first, ``d_state=1``,
  ``ssm_ratio=1``, no z gate (``with_z=False``), conv without bias.

Parameter names and shapes are VMamba's (``in_proj``, ``conv2d``, ``x_proj_weight``,
``dt_projs_weight``, ``dt_projs_bias``, ``A_logs``, ``Ds``, ``out_norm``, ``out_proj``), so
original checkpoints load with key renames only.

Data flow (``d_inner = ssm_ratio * d_model``, ``K = 4`` scan directions)::

    x -> in_proj -> [x | z] ; x -> dwconv -> SiLU -> cross_scan (K, d_inner, L)
      -> per-direction projections to (dt, B, C) -> selective scan -> cross_merge
      -> out_norm -> (* SiLU(z)) -> out_proj -> dropout

With the ``triton`` scan backend the cross-scan can be fused (:mod:`common.ops.cross_scan`): the
projections run on the map itself and the kernels read it in the four orders, so the
``(B, 4, d_inner, L)`` copy and the merge's un-permuting copies are not made. By default
(``fused_scan=None``) that happens where no gradient is needed and the backend's plane kernels apply
(``d_state`` <= 4: MSVM-UNet), which scan all four directions of a map in one program and sum them
there (on an H100 one graphed MSVM-UNet slice takes 13-20 % less time than with the written-out path;
their backward is about 2x slower, so training keeps the written-out path); ``fused_scan=True`` fuses
in training too, and at other state sizes through the chunked kernels (slower: benchmarks/README.md).

By default, where the ``triton`` backend's step kernels apply (``d_state`` 8-32: MSSMamba, Mamba-HUNet),
the scan is bidirectional (:func:`common.ops.cross_scan.bidirectional_selective_scan`): the rows view
of the map and one column-major copy are the two sequences, each scanned forward and backward with the
backward scans reading from the end, so the cross-scan is one transposed copy (no flips or
concatenation), the projections run on the two sequences with the four directions' weights stacked
per sequence, and the merge is sums. Same numbers as the four-copy path up to float rounding.

On that path, where no gradient is needed and the fused kernels run (CUDA; ``fused_io=True``),
:mod:`common.ops.ss2d_io` makes the dwconv + SiLU + cross-scan copy one kernel reading the
channels-last ``x`` half of ``in_proj``'s output, and the merge + ``out_norm`` + SiLU(z) gate another
writing channels-last for ``out_proj``; training, CPU runs and other backends use the unfused ops.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...ops import selective_scan
from ...ops.cross_scan import (
    bidirectional_scan_available,
    bidirectional_selective_scan,
    cross_merge,
    cross_scan,
    cross_selective_scan,
    fused_cross_scan_available,
    plane_cross_scan_available,
)
from ...ops.ss2d_io import conv_cross, fused_io_available, merge_norm, merge_norm_ref
from .layers import LayerNorm2d, Linear2d, norm_before_linear, to_channels_first, to_channels_last

# the cross-scan pair lives in common.ops.cross_scan
__all__ = ["SS2D", "cross_scan", "cross_merge", "exclude_scans_from_compile"]

K_DIRECTIONS = 4

# SS2D calls the scans through these names; exclude_scans_from_compile() makes torch.compile call them
# as they are (graph breaks). They look the functions up when called, so those can be replaced
# (complexity.py's FLOP counter).
def _selective_scan(*args, **kwargs):
    return selective_scan(*args, **kwargs)


def _cross_selective_scan(*args, **kwargs):
    return cross_selective_scan(*args, **kwargs)


def _bidirectional_selective_scan(*args, **kwargs):
    return bidirectional_selective_scan(*args, **kwargs)


_EXCLUDED_FROM_COMPILE = False


def exclude_scans_from_compile() -> None:
    """Make ``torch.compile`` leave SS2D's scans and its choice of scan path untraced (graph breaks
    around them): they run our own kernels, dispatched in Python (:mod:`common.ops`), which Dynamo
    should not trace. :func:`common.networks.compile_blocks` calls it; call it before compiling a
    network containing SS2D blocks in another way. Idempotent. Not done at import, because importing
    ``torch._dynamo`` loads Triton, which CPU use of this package does not need."""
    global _selective_scan, _cross_selective_scan, _bidirectional_selective_scan, _EXCLUDED_FROM_COMPILE
    if _EXCLUDED_FROM_COMPILE:
        return
    reason = "the selective scan runs its own kernels, dispatched in Python (common.ops)"
    _selective_scan = torch.compiler.disable(_selective_scan, reason=reason)
    _cross_selective_scan = torch.compiler.disable(_cross_selective_scan, reason=reason)
    _bidirectional_selective_scan = torch.compiler.disable(_bidirectional_selective_scan, reason=reason)
    SS2D._scan_path = torch.compiler.disable(SS2D._scan_path, reason=reason)
    _EXCLUDED_FROM_COMPILE = True


def _dt_bias_init(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """Bias such that softplus(bias) is log-uniform in [dt_min, dt_max] (Mamba's dt init)."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


class SS2D(nn.Module):
    """2D selective-scan (SS2D) block.

    Args:
        d_model: channels in and out.
        d_state: SSM state size N per channel.
        ssm_ratio: ``d_inner = int(ssm_ratio * d_model)``.
        dt_rank: rank of the dt projection, ``"auto"`` for ``ceil(d_model / 16)``.
        d_conv: depth-wise conv kernel size; ``< 2`` disables the conv.
        conv_bias: bias in the depth-wise conv.
        bias: bias in ``in_proj`` / ``out_proj``.
        dropout: dropout after ``out_proj``.
        with_z: multiply by the SiLU gate ``z`` (VMamba ``*_noz`` variants set False).
        out_norm: LayerNorm on the merged scan output (True) or none.
        channel_first: ``(B, C, H, W)`` in/out with 1x1-conv projections instead of ``(B, H, W, C)``.
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: Mamba's dt initialisation.
        initialize: ``"v0"`` (Mamba init: A = 1..N, D = 1, dt log-uniform), ``"v1"`` (random
            normal A_logs, dt) or ``"v2"`` (zero A_logs, small uniform dt): VMamba's options.
        force_fp32: run the projections around the scan in float32 under autocast.
        scan_backend: selective-scan backend (``None``: automatic, see :mod:`common.ops`).
        fused_scan: read the map in the four scan orders inside the scan kernel, where the backend
            has it (the ``triton`` one). ``None`` (default): where no gradient is needed and the
            backend's plane kernels apply (``d_state`` <= 4), which read each map once for all four
            directions; ``True``: always, training included (slower there than the written-out path)
            and through the chunked kernels at other state sizes; ``False``: never.
        bidirectional_scan: where the backend reads backward scans in place (the ``triton`` step
            kernels, ``d_state`` 8-32), scan the rows view and one column-major copy each forward and
            backward instead of making the four-direction copy (see the module docstring); False
            keeps the four-copy path (for comparisons).
        fused_io: on that bidirectional path, where no gradient is needed and the fused kernels run
            (CUDA; :mod:`common.ops.ss2d_io`), make the conv + SiLU + cross-scan copy one kernel and the
            merge + ``out_norm`` + z gate another; False keeps the unfused ops (for comparisons).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = True,
        bias: bool = False,
        dropout: float = 0.0,
        with_z: bool = True,
        out_norm: bool = True,
        channel_first: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        initialize: str = "v0",
        force_fp32: bool = False,
        scan_backend: str | None = None,
        fused_scan: bool | None = None,
        bidirectional_scan: bool = True,
        fused_io: bool = True,
    ) -> None:
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"SS2D: dt_init must be 'random' or 'constant', got {dt_init!r}")
        if initialize not in ("v0", "v1", "v2"):
            raise ValueError(f"SS2D: initialize must be 'v0', 'v1' or 'v2', got {initialize!r}")
        d_inner = int(ssm_ratio * d_model)
        dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_model, self.d_inner, self.d_state, self.dt_rank = d_model, d_inner, d_state, dt_rank
        self.channel_first, self.with_z, self.force_fp32 = channel_first, with_z, force_fp32
        self.scan_backend = scan_backend
        self.fused_scan = fused_scan
        self.bidirectional_scan = bidirectional_scan
        self.fused_io = fused_io
        linear = Linear2d if channel_first else nn.Linear
        k = K_DIRECTIONS

        self.in_proj = linear(d_model, d_inner * (2 if with_z else 1), bias=bias)
        self.act = nn.SiLU()
        self.conv2d = (
            nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
            if d_conv > 1
            else None
        )
        # per-direction projections of the scanned sequence to (dt, B, C), stacked over K
        bound = d_inner**-0.5  # nn.Linear's default init
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        if channel_first:
            self.out_norm = LayerNorm2d(d_inner) if out_norm else nn.Identity()
        else:
            self.out_norm = nn.LayerNorm(d_inner) if out_norm else nn.Identity()
        self.out_proj = linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_ssm(initialize, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_ssm(self, initialize, dt_init, dt_scale, dt_min, dt_max, dt_init_floor) -> None:
        k, d_inner, n = K_DIRECTIONS, self.d_inner, self.d_state
        if initialize == "v0":
            std = self.dt_rank**-0.5 * dt_scale
            if dt_init == "constant":
                self.dt_projs_weight.fill_(std)
            else:
                self.dt_projs_weight.uniform_(-std, std)
            self.dt_projs_bias.copy_(
                torch.stack([_dt_bias_init(d_inner, dt_min, dt_max, dt_init_floor) for _ in range(k)])
            )
            self.A_logs.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(k * d_inner, 1))
        elif initialize == "v1":
            self.dt_projs_weight.normal_()
            self.dt_projs_bias.normal_()
            self.A_logs.normal_()
        else:
            self.dt_projs_weight.uniform_(0, 0.1)
            self.dt_projs_bias.uniform_(0, 0.1)
            self.A_logs.zero_()
        self.Ds.fill_(1.0)

    def _project(self, src: torch.Tensor):
        """Per-direction dt ``(B, K, D, L)``, B and C ``(B, K, N, L)`` of ``src``: ``(B, K, D, L)`` (each
        direction's own sequence) or ``(B, 1, D, L)`` (the map, shared by the directions).

        Matmuls broadcast over the batch, (K, c, D) @ (B, K, D, L): same numbers as
        einsum("bkdl,kcd->bkcl"), which permutes into a batched GEMM that is 4-5x slower forward +
        backward at MSVM-UNet's thin shapes (c = dt_rank + 2N = 8) on an H100 and up to 13x on CPU
        (benchmarks/gpu/bench_projections.py).
        """
        n, r = self.d_state, self.dt_rank
        x_dbl = torch.matmul(self.x_proj_weight.to(src.dtype), src)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.matmul(self.dt_projs_weight.to(src.dtype), dts)  # (K, D, r) @ (B, K, r, L)
        return dts, bs, cs

    def _ssm_inputs(self):
        """A, D and delta_bias of the four directions, float32 (the scan's state math)."""
        return (-torch.exp(self.A_logs.float()), self.Ds.float(), self.dt_projs_bias.reshape(-1).float())

    def ssm(self, x: torch.Tensor) -> torch.Tensor:
        """The four-direction selective scan of a ``(B, d_inner, H, W)`` map, same shape out.

        Under ``torch.compile`` (:func:`common.networks.compile_blocks`) the copies, projections and
        merge around the scan are traced; the choice of path and the scan kernels are not (graph
        breaks: they are dispatched in Python, :mod:`common.ops`; :func:`exclude_scans_from_compile`)."""
        if self.force_fp32:
            x = x.float()
        path = self._scan_path(x)
        if path == "fused":
            return self._ssm_fused(x)
        if path == "bidirectional":
            return self._ssm_bidirectional(x)
        b, d, h, w = x.shape
        length = h * w
        xs = cross_scan(x)  # (B, K, D, L)
        dts, bs, cs = self._project(xs)
        A, D, bias = self._ssm_inputs()
        ys = _selective_scan(
            xs.reshape(b, -1, length),
            dts.reshape(b, -1, length),
            A,
            bs.contiguous(),
            cs.contiguous(),
            D,
            delta_bias=bias,
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return cross_merge(ys.view(b, K_DIRECTIONS, d, length), h, w)

    def _scan_path(self, x: torch.Tensor) -> str:
        """``"fused"`` (the map read in the four orders by the kernel), ``"bidirectional"`` or ``"cross"``
        (the written-out four-direction copy) for this call (see the class docstring)."""
        if self._takes_fused_scan(x):
            return "fused"
        if self.bidirectional_scan and bidirectional_scan_available(self.scan_backend, x.device, self.d_inner,
                                                                    self.d_state):
            return "bidirectional"
        return "cross"

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _takes_fused_scan(self, x: torch.Tensor) -> bool:
        if self.fused_scan is None:  # the plane kernels, for inference (their backward is the slower one)
            if self._needs_grad(x):
                return False
            return plane_cross_scan_available(self.scan_backend, x.device, self.d_inner, x.shape[-2], x.shape[-1],
                                              self.d_state)
        return self.fused_scan and fused_cross_scan_available(self.scan_backend, x.device)

    def _ssm_fused(self, x: torch.Tensor) -> torch.Tensor:
        # the projections are per position, so they run on the map itself, (K, c, D) @ (B, 1, D, L),
        # giving every direction's dt, B, C at the map's positions; the kernel reads them in scan order
        dts, bs, cs = self._project(x.flatten(2).unsqueeze(1))
        A, D, bias = self._ssm_inputs()
        return _cross_selective_scan(x, dts, A, bs.contiguous(), cs.contiguous(), D, bias, delta_softplus=True,
                                    backend=self.scan_backend)

    def _ssm_bidirectional(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w = x.shape
        seqs = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)  # (B, 2, D, L)
        ys = self._scan_bidirectional(seqs)
        return merge_norm_ref(ys, h, w, normalize=False).permute(0, 3, 1, 2)  # a view: the merge's layout

    def _scan_bidirectional(self, seqs: torch.Tensor) -> torch.Tensor:
        """The four directions' scans of the two sequences ``(B, 2, D, L)`` (rows view, column-major
        copy), ``(B, 4, D, L)`` in slot order: rows forward, rows backward, columns forward, columns
        backward, each at its sequence's positions."""
        # direction k = j + 2 r reads sequence j (rows, columns), reversed when r = 1; the kernel's slots
        # are (j, r), so the per-direction parameters are reordered to slot order (small copies)
        b, _, d, length = seqs.shape
        k, n, r = K_DIRECTIONS, self.d_state, self.dt_rank
        c = r + 2 * n

        def slots(p):  # (K, ...) direction-major -> slot-major
            return p.view(2, 2, *p.shape[1:]).transpose(0, 1).reshape(p.shape)

        x_proj = slots(self.x_proj_weight).reshape(2, 2 * c, d).to(seqs.dtype)
        x_dbl = torch.matmul(x_proj, seqs).view(b, k, c, length)  # (2, 2c, D) @ (B, 2, D, L)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.matmul(slots(self.dt_projs_weight).to(seqs.dtype), dts)  # (K, D, r) @ (B, K, r, L)
        A, D, bias = self._ssm_inputs()
        A = slots(A.view(k, d, n)).reshape(k * d, n)
        D, bias = slots(D.view(k, d)).reshape(-1), slots(bias.view(k, d)).reshape(-1)
        return _bidirectional_selective_scan(seqs, dts, A, bs, cs, D, bias, delta_softplus=True,
                                            backend=self.scan_backend)

    def _takes_fused_io(self, x: torch.Tensor) -> bool:
        """Whether this call takes the fused inference path (see the module docstring)."""
        if (not self.fused_io or self.channel_first or self.force_fp32 or self.fused_scan
                or not self.bidirectional_scan
                or self.conv2d is None or not isinstance(self.out_norm, (nn.LayerNorm, nn.Identity))):
            return False
        if self._needs_grad(x):
            return False
        return fused_io_available(x.device) and bidirectional_scan_available(self.scan_backend, x.device,
                                                                              self.d_inner, self.d_state)

    def _forward_fused_io(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        _, h, w, _ = x.shape
        ys = self._scan_bidirectional(conv_cross(x, self.conv2d.weight, self.conv2d.bias))
        norm = self.out_norm
        ln = isinstance(norm, nn.LayerNorm)
        y = merge_norm(ys, h, w, z, norm.weight if ln else None, norm.bias if ln else None,
                       norm.eps if ln else 0.0, normalize=ln, z_silu=True)
        return self.dropout(self.out_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` (or ``(B, C, H, W)`` when ``channel_first``) -> same shape."""
        x = self.in_proj(x)
        cdim = 1 if self.channel_first else -1
        z = None
        if self.with_z:
            x, z = x.chunk(2, dim=cdim)
        if self._takes_fused_io(x):
            return self._forward_fused_io(x, z)
        if z is not None:
            z = self.act(z)
        if not self.channel_first:
            x = to_channels_first(x).contiguous()
        if self.conv2d is not None:
            x = self.conv2d(x)
        y = self.ssm(self.act(x)).to(x.dtype)
        if not self.channel_first:
            y = to_channels_last(y)
        if z is not None:
            y = self.out_norm(y) * z
        else:  # out_proj reads the norm in its autocast dtype
            y = norm_before_linear(self.out_norm, y)
        return self.dropout(self.out_proj(y))
