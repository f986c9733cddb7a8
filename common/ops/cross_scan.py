"""VMamba's four-direction cross-scan around the selective scan, fused where the backend allows.

SS2D scans a ``(B, D, H, W)`` map in four orders (row-major, column-major, and both reversed),
runs one selective scan per order and sums the four outputs back at the map's positions.
Written out (:func:`cross_selective_scan_ref`), that copies the map into a ``(B, 4, D, H*W)``
tensor (:func:`cross_scan`), and un-permutes and sums the outputs (:func:`cross_merge`).

:func:`cross_selective_scan` takes the per-direction inputs at the map's positions instead
(``delta`` ``(B, 4, D, H*W)``, ``B`` / ``C`` ``(B, 4, N, H*W)``: what the per-direction projections
give when applied to the map itself, before any permutation). With the ``triton`` backend the
kernels read every input at the position of step ``t`` of their direction and write the output
there, so no ``(B, 4, D, H*W)`` copy of the map is made and the merge is a sum over the directions;
every other backend gets the inputs permuted into scan order (:func:`to_scan_order`) and runs the
written-out composition. Both give the same numbers (tests/test_cross_scan.py).

:func:`bidirectional_selective_scan` is the middle way SS2D takes by default on the ``triton``
backend: each of ``G`` sequences (SS2D: the map's rows view and one column-major copy) is scanned
forward and backward in time, the backward scan reading its inputs from the end (position ``L - 1 -
t`` at step ``t``) and writing its output there, so the cross-scan is one transposed copy with no
flips or concatenation and the merge is sums. Both memory walks stay contiguous, which the fully
fused mode's column-major walk is not. Other backends run the composition with reversed copies
(:func:`bidirectional_selective_scan_ref`).
"""

from __future__ import annotations

import torch

from .dispatch import resolve_backend, selective_scan

__all__ = [
    "cross_scan",
    "cross_merge",
    "to_scan_order",
    "cross_selective_scan",
    "cross_selective_scan_ref",
    "fused_cross_scan_available",
    "plane_cross_scan_available",
    "bidirectional_selective_scan",
    "bidirectional_selective_scan_ref",
    "bidirectional_scan_available",
]

K_DIRECTIONS = 4


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W): row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    xs = torch.stack([rows, cols], dim=1)
    return torch.cat([xs, xs.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4, D, H*W) -> (B, D, H, W): undo each direction's order and sum (adjoint of cross_scan)."""
    b, _, d, _ = ys.shape
    y = ys[:, :2] + ys[:, 2:].flip(-1)
    return y[:, 0].view(b, d, height, width) + y[:, 1].view(b, d, width, height).transpose(2, 3)


def to_scan_order(a: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-direction values at the map's positions ``(B, 4, C, H*W)`` -> each in its direction's scan order."""
    b, k, c, length = a.shape
    if k != K_DIRECTIONS or length != height * width:
        raise ValueError(f"to_scan_order: expected (B, 4, C, {height}*{width}), got {tuple(a.shape)}")
    cols = a[:, 1::2].reshape(b, 2, c, height, width).transpose(-1, -2).reshape(b, 2, c, length)
    rows = a[:, 0::2]
    out = torch.stack([rows[:, 0], cols[:, 0], rows[:, 1].flip(-1), cols[:, 1].flip(-1)], dim=1)
    return out


def _check(x, delta, A, B, C):
    if x.dim() != 4:
        raise ValueError(f"cross_selective_scan: x must be (B, D, H, W), got {tuple(x.shape)}")
    b, d, h, w = x.shape
    want = (b, K_DIRECTIONS, d, h * w)
    if tuple(delta.shape) != want:
        raise ValueError(f"cross_selective_scan: delta must be {want} (directions at the map's positions), "
                         f"got {tuple(delta.shape)}")
    if tuple(A.shape[:1]) != (K_DIRECTIONS * d,):
        raise ValueError(f"cross_selective_scan: A must be ({K_DIRECTIONS * d}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, K_DIRECTIONS, n, h * w):
            raise ValueError(f"cross_selective_scan: {name} must be {(b, K_DIRECTIONS, n, h * w)}, "
                             f"got {tuple(t.shape)}")


def cross_selective_scan_ref(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend=None):
    """The written-out composition: cross_scan, permute the inputs, selective scan, cross_merge."""
    _check(x, delta, A, B, C)
    b, d, h, w = x.shape
    xs = cross_scan(x).reshape(b, K_DIRECTIONS * d, h * w)
    ys = selective_scan(xs, to_scan_order(delta, h, w).reshape(b, K_DIRECTIONS * d, h * w), A,
                        to_scan_order(B, h, w), to_scan_order(C, h, w), D, None, delta_bias, delta_softplus,
                        backend=backend)
    return cross_merge(ys.view(b, K_DIRECTIONS, d, h * w), h, w)


def fused_cross_scan_available(backend: str | None, device: torch.device | str) -> bool:
    """Whether :func:`cross_selective_scan` runs fused (no map copies) for this backend choice and device."""
    return resolve_backend(backend, device) == "triton"


def plane_cross_scan_available(backend: str | None, device: torch.device | str, d: int, height: int, width: int,
                               d_state: int) -> bool:
    """Whether :func:`cross_selective_scan` runs on the ``triton`` backend's plane kernels here: one program
    reads a whole ``height x width`` map (up to 4096 elements once padded to powers of two) for all four
    directions, ``d_state`` <= 4 (MSVM-UNet's SS2D)."""
    if resolve_backend(backend, device) != "triton":
        return False
    from .scan_triton import plane_cross_scan_applies

    return plane_cross_scan_applies(d, height, width, d_state)


def cross_selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Four-direction selective scan of a map, summed back at the map's positions.

    Args:
        x: the map, ``(B, D, H, W)``.
        delta: time steps of the four directions at the map's positions, ``(B, 4, D, H*W)``.
        A: ``(4 * D, N)``, direction-major (channel ``k * D + i`` is channel ``i`` of direction ``k``).
        B, C: ``(B, 4, N, H*W)`` at the map's positions.
        D, delta_bias: ``(4 * D,)``.
        delta_softplus: softplus on ``delta + delta_bias``.
        backend: as :func:`common.ops.selective_scan`; ``triton`` runs fused.

    Returns:
        ``(B, D, H, W)``: the sum of the four directions' outputs, in ``x``'s dtype.
    """
    _check(x, delta, A, B, C)
    name = resolve_backend(backend, x.device)
    if name != "triton":
        return cross_selective_scan_ref(x, delta, A, B, C, D, delta_bias, delta_softplus, backend=name)
    from .scan_triton import cross_selective_scan_triton

    return cross_selective_scan_triton(x, delta, A, B, C, D, delta_bias, delta_softplus)


def _check_bidirectional(u, delta, A, B, C):
    if u.dim() != 4:
        raise ValueError(f"bidirectional_selective_scan: u must be (batch, G, d, L), got {tuple(u.shape)}")
    b, g, d, length = u.shape
    if tuple(delta.shape) != (b, 2 * g, d, length):
        raise ValueError(f"bidirectional_selective_scan: delta must be {(b, 2 * g, d, length)} (slot 2g forward, "
                         f"2g + 1 backward over sequence g), got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != 2 * g * d:
        raise ValueError(f"bidirectional_selective_scan: A must be ({2 * g * d}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (b, 2 * g, n, length):
            raise ValueError(f"bidirectional_selective_scan: {name} must be {(b, 2 * g, n, length)}, "
                             f"got {tuple(t.shape)}")


def _bidirectional_order(a: torch.Tensor) -> torch.Tensor:
    """(batch, 2G, c, L) at the positions -> each slot in its scan's time order (odd slots reversed)."""
    b, k, c, length = a.shape
    a = a.view(b, k // 2, 2, c, length)
    return torch.stack([a[:, :, 0], a[:, :, 1].flip(-1)], dim=2).view(b, k, c, length)


def bidirectional_selective_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                                     backend=None):
    """The composition with reversed copies: each sequence twice (the second reversed), one selective
    scan over the ``2G`` slots, the backward scans' outputs reversed back to the positions."""
    _check_bidirectional(u, delta, A, B, C)
    b, g, d, length = u.shape
    xs = torch.stack([u, u.flip(-1)], dim=2).reshape(b, 2 * g * d, length)
    ys = selective_scan(xs, _bidirectional_order(delta).reshape(b, 2 * g * d, length), A,
                        _bidirectional_order(B), _bidirectional_order(C), D, None, delta_bias, delta_softplus,
                        backend=backend)
    return _bidirectional_order(ys.view(b, 2 * g, d, length))


def bidirectional_scan_available(backend: str | None, device: torch.device | str, d: int, d_state: int) -> bool:
    """Whether :func:`bidirectional_selective_scan` reads in place (no reversed copies) here: the
    ``triton`` backend with its step kernels (8 <= N <= 32, slots of a multiple of 8 channels)."""
    if resolve_backend(backend, device) != "triton":
        return False
    from .scan_triton import bidirectional_step_available

    return bidirectional_step_available(d, d_state, torch.device(device))


def bidirectional_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Each of ``G`` sequences scanned forward and backward in time, every value at its position.

    Args:
        u: the sequences, ``(batch, G, d, L)``.
        delta: time steps at the sequences' positions, ``(batch, 2G, d, L)``: slot ``2g`` is the
            forward scan of sequence ``g``, slot ``2g + 1`` its backward scan (whose step ``t`` is
            position ``L - 1 - t``).
        A: ``(2G * d, N)``, slot-major.
        B, C: ``(batch, 2G, N, L)`` at the positions.
        D, delta_bias: ``(2G * d,)``.
        delta_softplus: softplus on ``delta + delta_bias``.
        backend: as :func:`common.ops.selective_scan`; ``triton`` (with its step kernels) reads in place.

    Returns:
        ``(batch, 2G, d, L)``: each scan's output at the positions, in ``u``'s dtype.
    """
    _check_bidirectional(u, delta, A, B, C)
    name = resolve_backend(backend, u.device)
    if not bidirectional_scan_available(name, u.device, u.shape[2], A.shape[1]):
        return bidirectional_selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus, backend=name)
    from .scan_triton import bidirectional_selective_scan_triton

    return bidirectional_selective_scan_triton(u, delta, A, B, C, D, delta_bias, delta_softplus)
