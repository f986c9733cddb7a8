"""``selective_scan``: one entry point, several backends, chosen per call.

Backends (all with mamba-ssm's ``selective_scan_fn`` semantics):

- ``"cpu"``: this project's compiled CPU kernel (:mod:`common.ops.scan_cpu`: C + OpenMP, built with
  the machine's C compiler on first use and cached); CPU tensors; 2.4-5.4x faster than ``torch``
  forward + backward there (``benchmarks/README.md``).
- ``"torch"``: the chunked pure-PyTorch scan in :mod:`common.ops.scan_torch`; any device, autograd.
- ``"mamba_ssm"``: mamba-ssm's CUDA kernel, when the package imports and the tensors are on CUDA.
- ``"triton"``: this project's own Triton kernel (:mod:`common.ops.scan_triton`, JIT-compiled on
  first use, no build step), on CUDA tensors when triton imports. On CPU tensors it runs only under
  Triton's interpreter, when ``TRITON_INTERPRET=1`` is set and the backend is named explicitly
  (tests at small shapes); it is never chosen automatically there.
- ``"export"``: :mod:`common.ops.scan_export`, plain out-of-place tensor operations, ``O(log L)`` of
  them per segment of the sequence: what TorchScript and ONNX export trace (any device; never chosen
  automatically).
- ``"ref"``: the sequential reference (tests and debugging only; never chosen automatically).

Choosing: the ``backend`` argument wins, then the environment variable
``MAMBA_BUNDLES_SCAN_BACKEND`` (``auto`` or empty means automatic), then automatic choice: on
CUDA the fastest available GPU backend (``mamba_ssm`` when it is installed: on an H200 its kernel is
on par with ours at N = 16 forward + backward (0.80-1.09x) and 1.2-2x faster at N = 1,
``benchmarks/README.md``; else ``triton``, which needs no build step); on CPU ``cpu`` when its kernel
builds (a C compiler is present), otherwise ``torch``.
A backend that was asked for by name and cannot run raises ``RuntimeError`` saying why.

Nothing here imports mamba_ssm or triton until a CUDA tensor asks for them, and the CPU kernel is
compiled only when a CPU scan first runs.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from collections.abc import Callable

import torch

from .scan_export import selective_scan_export
from .scan_ref import check_scan_inputs, selective_scan_ref
from .scan_torch import selective_scan_torch

__all__ = [
    "selective_scan",
    "selective_scan_ref",
    "resolve_backend",
    "available_backends",
    "backend_unavailable_reason",
    "SCAN_BACKENDS",
    "SCAN_BACKEND_ENV",
]

SCAN_BACKEND_ENV = "MAMBA_BUNDLES_SCAN_BACKEND"
SCAN_BACKENDS = ("cpu", "torch", "mamba_ssm", "triton", "export", "ref")
# fastest first (H200 measurements in benchmarks/README.md); triton moves ahead once it beats mamba-ssm
_GPU_PREFERENCE = ("mamba_ssm", "triton")


@functools.cache
def _load_mamba_ssm() -> tuple[Callable | None, str | None]:
    try:
        mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        return mod.selective_scan_fn, None
    except Exception as err:  # ImportError, OSError from a missing .so, a CUDA mismatch...
        return None, f"mamba_ssm is not importable ({type(err).__name__}: {err})"


@functools.cache
def _load_triton() -> tuple[Callable | None, str | None]:
    try:
        mod = importlib.import_module("common.ops.scan_triton")
    except ModuleNotFoundError as err:
        if err.name == "triton" or (err.name or "").startswith("triton."):
            return None, f"triton is not importable ({err}); pip install triton"
        return None, f"the triton backend failed to import ({err})"
    except Exception as err:
        return None, f"the triton backend failed to import ({type(err).__name__}: {err})"
    return mod.selective_scan_triton, None


def _cpu_reason() -> str | None:
    from .scan_cpu import library_unavailable_reason

    return library_unavailable_reason()


def backend_unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """``None`` when ``backend`` can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if backend not in SCAN_BACKENDS:
        return f"unknown scan backend {backend!r}; choose one of {', '.join(SCAN_BACKENDS)} (or None for automatic)"
    if backend in ("torch", "export", "ref"):
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got tensors on {device.type}"
        return _cpu_reason()
    if backend == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return _load_triton()[1]  # Triton's interpreter runs the kernels on CPU tensors
        return (f"the triton backend needs CUDA tensors, got tensors on {device.type} (set TRITON_INTERPRET=1 to "
                "run its kernels under Triton's CPU interpreter: slow, tests only)")
    if device.type != "cuda":
        return f"the {backend} backend needs CUDA tensors, got tensors on {device.type}"
    loader = _load_mamba_ssm if backend == "mamba_ssm" else _load_triton
    return loader()[1]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this environment, fastest first.

    Triton's CPU interpreter is not listed: it runs only when named explicitly.
    """
    device = torch.device(device)
    order = (*_GPU_PREFERENCE, "cpu", "torch", "export", "ref")
    return [b for b in order if backend_unavailable_reason(b, device) is None
            and not (b == "triton" and device.type != "cuda")]


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """Turn ``backend`` (name, ``None`` or ``"auto"``) into the backend that will run on ``device``."""
    if backend is None or backend == "auto":
        env = os.environ.get(SCAN_BACKEND_ENV, "").strip()
        backend = None if env in ("", "auto") else env
    if backend is None:
        device = torch.device(device)
        if device.type == "cuda":
            for name in _GPU_PREFERENCE:
                if backend_unavailable_reason(name, device) is None:
                    return name
        elif device.type == "cpu" and _cpu_reason() is None:
            return "cpu"
        return "torch"
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"selective_scan: cannot use backend {backend!r}: {reason}")
    return backend


def _groups(x: torch.Tensor) -> int | None:
    """Group count of a B/C tensor: None when fixed (dim, N), 1 for (batch, N, L)."""
    return None if x.dim() == 2 else (1 if x.dim() == 3 else x.shape[1])


def _selective_scan_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """mamba-ssm's kernel, with B and C brought to the one group count the kernel accepts."""
    gb, gc = _groups(B), _groups(C)
    if gb is not None and gc is not None and gb != gc:
        g = math.lcm(gb, gc)  # a group split finer is the same operator: repeat each group's rows
        B = B.unsqueeze(1) if B.dim() == 3 else B
        C = C.unsqueeze(1) if C.dim() == 3 else C
        B, C = B.repeat_interleave(g // gb, dim=1), C.repeat_interleave(g // gc, dim=1)
    elif (gb is None and (gc or 1) > 1) or (gc is None and (gb or 1) > 1):
        raise RuntimeError(
            "selective_scan: mamba-ssm's kernel cannot combine a fixed (dim, N) B or C with a grouped "
            f"(batch, groups>1, N, L) one (B {tuple(B.shape)}, C {tuple(C.shape)}); use backend='torch'"
        )
    return _load_mamba_ssm()[0](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _implementation(name: str) -> Callable:
    if name == "torch":
        return selective_scan_torch
    if name == "ref":
        return selective_scan_ref
    if name == "export":
        return selective_scan_export
    if name == "mamba_ssm":
        return _selective_scan_mamba_ssm
    if name == "cpu":
        from .scan_cpu import selective_scan_cpu

        return selective_scan_cpu
    return _load_triton()[0]


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str | None = None,
):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` semantics, on the chosen backend.

    Args:
        u: input, ``(batch, dim, L)``.
        delta: time steps, ``(batch, dim, L)``.
        A: real state matrix (diagonal per channel), ``(dim, N)``.
        B: input projection: ``(dim, N)``, ``(batch, N, L)`` or ``(batch, groups, N, L)``.
        C: output projection, same forms as ``B``.
        D: skip connection per channel, ``(dim,)``.
        z: gate, ``(batch, dim, L)``: the output is multiplied by ``silu(z)``.
        delta_bias: added to ``delta`` per channel, ``(dim,)``.
        delta_softplus: apply softplus to ``delta`` (after the bias).
        return_last_state: also return the state after the last step, ``(batch, dim, N)``.
        backend: ``"cpu"``, ``"torch"``, ``"mamba_ssm"``, ``"triton"``, ``"export"``, ``"ref"`` or ``None``
            (automatic; see the module docstring for the environment variable).

    Returns:
        ``out`` ``(batch, dim, L)`` in ``u``'s dtype (state math in float32), or
        ``(out, last_state)``.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    return _implementation(name)(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )
