"""Compiled selective scan for CPU tensors (the ``cpu`` backend): C + OpenMP, built on first use.

The pure-PyTorch backend (:mod:`common.ops.scan_torch`) is memory-bound: every one of its ~10
tensor passes over the ``(L, batch, dim, N)`` states goes through memory. Here one C loop per
(batch, block of 16 channels: one AVX-512 vector; 8 channels, one 256-bit vector, without AVX-512 or
where 16 does not divide the channels of a B / C group) keeps the states in registers and vectorises
across the channels (``csrc/selective_scan_cpu.c``): forward, and a backward that recomputes the states
segment by segment (every ``K`` = 16 steps, so a segment's states and decays stay in L1) from
checkpoints the forward kept, then runs the adjoint recurrence backwards. Softplus, ``delta_bias``,
``D`` and the ``z`` gate are fused into the kernel. The grouped ``dB`` / ``dC`` of a step (a sum over
the block's channels for each state) are reduced 16 or 8 states at a time with vector shuffles; the
segment tiles are transposed in registers. Multiply-adds compile to FMA instructions
(``-ffp-contract=fast``). Float32
state math for float32/bf16/fp16 inputs, float64 for float64.

Build: the first call compiles the C file with the machine's C compiler (``$CC``, else ``cc`` /
``gcc``; ``-O3 -march=native -fopenmp``, falling back to portable flags and then to no OpenMP)
into ``$MAMBA_BUNDLES_CACHE`` (default ``~/.cache/mamba_bundles``), under a name that hashes the
source, the flags, the compiler and the machine, writing to a temporary name and renaming, so
concurrent first calls are safe; later calls load the cached library. When no compiler works the
backend reports why and automatic choice uses the ``torch`` backend.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch

from .scan_ref import check_scan_inputs
from .scan_torch import compute_dtype

__all__ = ["selective_scan_cpu", "load_library", "library_unavailable_reason", "CACHE_ENV"]

CACHE_ENV = "MAMBA_BUNDLES_CACHE"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "selective_scan_cpu.c")
# -ffp-contract=fast: multiply-adds as FMA instructions (-std=c11 alone turns contraction off)
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast", "-Wno-psabi"],
    ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast", "-Wno-psabi"],
    ["-O3", "-fno-math-errno", "-ffp-contract=fast", "-Wno-psabi"],  # no OpenMP: one thread
)
_LANES = 8  # channels per task (VLANES in the C file: one 256-bit vector of floats); 16 with AVX-512
_SEGMENT = 16  # steps between the forward's state checkpoints (K)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mamba_bundles")


def _signature(cc: str, flags: list[str], source: bytes) -> str:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    cpu = ""
    if "-march=native" in flags and os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:  # native code is only valid on the same processor
            cpu = "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    text = "\0".join([source.decode(), " ".join(flags), version, platform.machine(), cpu])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build(cc: str, flags: list[str]) -> str:
    """Path of the compiled library for ``flags`` (compiled now unless cached); raises on failure."""
    with open(_SOURCE, "rb") as f:
        source = f.read()
    out_dir = _cache_dir()
    path = os.path.join(out_dir, f"selective_scan_cpu_{_signature(cc, flags, source)}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, "-shared", "-fPIC", "-std=c11", _SOURCE, "-o", tmp, "-lm"],
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cc)} {' '.join(flags)} failed: {res.stderr.strip()[-400:]}")
        os.replace(tmp, path)  # atomic: a concurrent build of the same source writes the same file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"ss_fwd_{suffix}")
        fwd.argtypes = [p] * 11 + [i64] * 7 + [i32] * 3
        fwd.restype = i32
        bwd = getattr(lib, f"ss_bwd_{suffix}")
        bwd.argtypes = [p] * 19 + [i64] * 7 + [i32] * 3
        bwd.restype = i32
    lib.ss_wide_lanes.argtypes = []
    lib.ss_wide_lanes.restype = i32


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc)"
    errors = []
    for flags in _FLAG_SETS:
        try:
            lib = ctypes.CDLL(_build(cc, flags))
            _declare(lib)
            return lib, None
        except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as err:
            errors.append(str(err))
    return None, "could not build the CPU scan kernel: " + " | ".join(errors)


def load_library() -> ctypes.CDLL:
    """The compiled kernel library (built on first call); ``RuntimeError`` saying why when it cannot be."""
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(reason)
    return lib


def library_unavailable_reason() -> str | None:
    """``None`` when the kernel is built (or builds now), else why it cannot be."""
    return _load()[1]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _lanes(dim: int, gb: int, gc: int, dtype: torch.dtype, wide: int = 2 * _LANES) -> int:
    """Float32 channels per task: ``wide`` (the library's preference, 16 with AVX-512) or 8 when
    every block of that many channels lies inside one B group and one C group, else 1 (float64
    always 1: it is there for gradcheck)."""
    if dtype != torch.float32:
        return 1
    for w in dict.fromkeys((wide, _LANES)):
        if dim % w == 0 and all(g == 0 or (dim // g) % w == 0 for g in (gb, gc)):
            return w
    return 1


def _bc_layout(x: torch.Tensor, cdt: torch.dtype) -> tuple[torch.Tensor, int]:
    """B or C in the kernel's layout and its group count (0: fixed ``(dim, N)``)."""
    x = x.to(cdt)
    if x.dim() == 2:
        return x.t().contiguous(), 0  # (N, dim)
    if x.dim() == 3:
        return x.transpose(1, 2).contiguous(), 1  # (batch, L, N)
    return x.transpose(2, 3).contiguous(), x.shape[1]  # (batch, G, L, N)


def _bc_grad(part: torch.Tensor, like: torch.Tensor, g: int, w: int) -> torch.Tensor:
    """The kernel's partial B/C gradient reduced to ``like``'s shape and dtype."""
    if g == 0:
        return part.sum(0).to(like.dtype)  # (batch, dim, N) -> (dim, N)
    batch, nblk, length, n = part.shape
    out = part.view(batch, g, nblk // g, length, n).sum(2).transpose(2, 3)  # (batch, G, N, L)
    return (out[:, 0] if like.dim() == 3 else out).to(like.dtype).contiguous()


def _threads() -> int:
    return max(1, torch.get_num_threads())


class _Prepared:
    """Inputs as the kernel takes them: compute dtype, contiguous, A and B/C in its layouts."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        self.cdt = cdt = compute_dtype(u)
        self.batch, self.dim, self.length = u.shape
        self.n = A.shape[1]
        vec = lambda t: None if t is None else t.to(cdt).contiguous()  # noqa: E731
        self.u, self.delta, self.z, self.D, self.bias = vec(u), vec(delta), vec(z), vec(D), vec(delta_bias)
        self.At = A.to(cdt).t().contiguous()
        self.Bk, self.gb = _bc_layout(B, cdt)
        self.Ck, self.gc = _bc_layout(C, cdt)
        self.softplus = int(bool(delta_softplus))
        self.w = _lanes(self.dim, self.gb, self.gc, cdt, load_library().ss_wide_lanes())
        self.nseg = -(-self.length // _SEGMENT)
        self.suffix = "f64" if cdt == torch.float64 else "f32"

    def inputs(self) -> list:
        return [_ptr(t) for t in (self.u, self.delta, self.bias, self.At, self.Bk, self.Ck, self.D, self.z)]

    def sizes(self) -> tuple:
        return (self.batch, self.dim, self.length, self.n, self.gb, self.gc, _SEGMENT, self.softplus, self.w,
                _threads())

    def empty(self, *shape) -> torch.Tensor:
        return torch.empty(*shape, dtype=self.cdt)


def _check(rc: int, p: _Prepared) -> None:
    if rc == -2:
        raise MemoryError("selective_scan (cpu): the kernel could not allocate its work buffers")
    if rc != 0:
        raise RuntimeError("selective_scan (cpu): the kernel refused (batch, dim, L, N, gb, gc, K, softplus, W, "
                           f"threads) = {p.sizes()}")


class SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        lib = load_library()
        p = _Prepared(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        out = p.empty(p.batch, p.dim, p.length)
        last = p.empty(p.batch, p.dim, p.n)
        ckpt = p.empty(p.batch, p.dim, p.nseg, p.n)  # states at segment starts, for the backward
        rc = getattr(lib, f"ss_fwd_{p.suffix}")(*p.inputs(), _ptr(out), _ptr(last), _ptr(ckpt), *p.sizes())
        _check(rc, p)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.delta_softplus = delta_softplus
        if not return_last_state:
            ctx.mark_non_differentiable(last)
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        lib = load_library()
        p = _Prepared(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus)
        do = dout.to(p.cdt).contiguous()
        dl = dlast.to(p.cdt).contiguous() if dlast is not None else None
        du, ddelta = p.empty(p.batch, p.dim, p.length), p.empty(p.batch, p.dim, p.length)
        dz = p.empty(p.batch, p.dim, p.length) if z is not None else None
        dA = p.empty(p.batch, p.dim, p.n)
        grad_shape = lambda g: (p.batch, p.dim, p.n) if g == 0 else (p.batch, p.dim // p.w, p.length, p.n)  # noqa: E731
        dB, dC = p.empty(*grad_shape(p.gb)), p.empty(*grad_shape(p.gc))
        dD, dbias = p.empty(p.batch, p.dim), p.empty(p.batch, p.dim)
        rc = getattr(lib, f"ss_bwd_{p.suffix}")(
            *p.inputs(), _ptr(do), _ptr(dl), _ptr(ckpt), *(_ptr(t) for t in (du, ddelta, dz, dA, dB, dC, dD, dbias)),
            *p.sizes())
        _check(rc, p)
        return (
            du.to(u.dtype),
            ddelta.to(delta.dtype),
            dA.sum(0).to(A.dtype),
            _bc_grad(dB, B, p.gb, p.w),
            _bc_grad(dC, C, p.gc, p.w),
            dD.sum(0).to(D.dtype) if D is not None else None,
            dz.to(z.dtype) if z is not None else None,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            None,
            None,
        )


def selective_scan_cpu(
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
):
    """Compiled CPU selective scan; same signature and semantics as ``selective_scan_ref``."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type != "cpu":
        raise RuntimeError(f"selective_scan (cpu): needs CPU tensors, got tensors on {u.device.type}")
    if u.shape[-1] == 0:
        from .scan_ref import selective_scan_ref

        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out, last = SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return (out, last) if return_last_state else out
