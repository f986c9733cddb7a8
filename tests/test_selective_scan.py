"""Selective scan: every backend on this machine against the sequential reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from common.ops import (
    SCAN_BACKEND_ENV,
    available_backends,
    backend_unavailable_reason,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
)
from common.ops.scan_torch import chunked_linear_scan_

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(dev, be) for dev in DEVICES for be in available_backends(dev) if be != "ref"]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def make_inputs(batch, dim, length, n, groups, dtype, device, *, b_form="grouped", delta_scale=1.0, seed=0):
    """Random scan inputs in the layouts SS2D produces (bf16 activations, float32 A/D/bias)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    u = rnd(batch, dim, length).to(dtype)
    delta = (rnd(batch, dim, length, scale=0.5) * delta_scale).to(dtype)
    A = -torch.exp(rnd(dim, n, scale=0.5))
    forms = {
        "grouped": (batch, groups, n, length),
        "shared": (batch, n, length),
        "fixed": (dim, n),
    }
    B = rnd(*forms[b_form]).to(dtype)
    C = rnd(*forms["grouped"]).to(dtype)
    D = rnd(dim)
    z = rnd(batch, dim, length).to(dtype)
    bias = rnd(dim, scale=0.5)
    return u, delta, A, B, C, D, z, bias


def run_both(backend, inputs, **kw):
    u, delta, A, B, C, D, z, bias = inputs
    args = dict(
        D=D if kw.get("with_d", True) else None,
        z=z if kw.get("with_z", True) else None,
        delta_bias=bias if kw.get("with_bias", True) else None,
        delta_softplus=kw.get("softplus", True),
        return_last_state=kw.get("last_state", False),
    )
    out = selective_scan(u, delta, A, B, C, backend=backend, **args)
    ref = selective_scan_ref(u, delta, A, B, C, **args)
    return out, ref


def assert_close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,n", [(1, 1), (4, 16), (1, 16), (4, 1)])
@pytest.mark.parametrize("length", [1, 7, 64, 333, 4096])
def test_forward_matches_reference(device, backend, dtype, groups, n, length):
    inputs = make_inputs(2, 8, length, n, groups, dtype, device)
    (out, last), (ref, ref_last) = run_both(backend, inputs, last_state=True)
    assert out.dtype == dtype and out.shape == (2, 8, length)
    assert last.shape == (2, 8, n)
    assert_close(out, ref, dtype)
    assert_close(last, ref_last, dtype)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize(
    "opts",
    [
        dict(with_d=False, with_z=False, with_bias=False, softplus=False),
        dict(with_d=True, with_z=False, with_bias=True, softplus=True),
        dict(with_d=False, with_z=True, with_bias=False, softplus=True),
        dict(with_d=True, with_z=True, with_bias=True, softplus=False, last_state=True),
    ],
)
@pytest.mark.parametrize("b_form", ["grouped", "shared", "fixed"])
def test_options_and_b_forms(device, backend, opts, b_form):
    inputs = make_inputs(2, 8, 50, 4, 2, torch.float32, device, b_form=b_form)
    if not opts["softplus"]:  # without softplus the caller keeps delta positive (a stable recurrence)
        u, delta, A, B, C, D, z, bias = inputs
        inputs = (u, delta.abs() + 0.01, A, B, C, D, z, bias.abs())
    if backend == "mamba_ssm" and b_form == "fixed":
        with pytest.raises(RuntimeError, match="cannot combine a fixed"):
            run_both(backend, inputs, **opts)
        return
    out, ref = run_both(backend, inputs, **opts)
    if opts.get("last_state"):
        assert_close(out[1], ref[1], torch.float32)
        out, ref = out[0], ref[0]
    assert_close(out, ref, torch.float32)


def _grads(fn, inputs, names, last_state, seed=1):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    u, delta, A, B, C, D, z, bias = leaves
    res = fn(u, delta, A, B, C, D, z, bias, True, last_state)
    g = torch.Generator().manual_seed(seed)
    if last_state:
        out, last = res
        loss = (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum()
        loss = loss + (last * torch.randn(last.shape, generator=g).to(last.device)).sum()
    else:
        loss = (res.float() * torch.randn(res.shape, generator=g).to(res.device)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return dict(zip(names, grads))


NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length,groups,n,b_form", [(1, 1, 1, "grouped"), (97, 4, 16, "grouped"),
                                                    (300, 1, 16, "shared"), (64, 2, 4, "fixed")])
@pytest.mark.parametrize("last_state", [False, True])
def test_gradients_match_reference(device, backend, dtype, length, groups, n, b_form, last_state):
    if backend == "mamba_ssm" and last_state:
        pytest.skip("mamba-ssm returns last_state without a gradient path (its backward ignores it)")
    if backend == "mamba_ssm" and b_form == "fixed" and groups > 1:
        pytest.skip("mamba-ssm's kernel cannot mix a fixed B with a grouped C (tested in test_options_and_b_forms)")
    inputs = make_inputs(2, 8, length, n, groups, dtype, device, b_form=b_form)

    def ours(*a):
        return selective_scan(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=a[8],
                              return_last_state=a[9], backend=backend)

    got = _grads(ours, inputs, NAMES, last_state)
    want = _grads(selective_scan_ref, inputs, NAMES, last_state)
    for name in NAMES:
        assert got[name].dtype == inputs[NAMES.index(name)].dtype, name
        # gradients summed over many steps: compare relative to their scale
        scale = want[name].float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(got[name].float() / scale, want[name].float() / scale,
                                   **TOL[dtype], msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("b_form", ["grouped", "shared", "fixed"])
def test_gradcheck_float64(device, backend, b_form):
    if backend == "mamba_ssm":
        pytest.skip("mamba-ssm's CUDA kernel has no float64 instantiation")
    u, delta, A, B, C, D, z, bias = make_inputs(1, 4, 13, 3, 2, torch.float64, device, b_form=b_form)
    A, D, bias = A.double(), D.double(), bias.double()
    leaves = [t.detach().requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias)]

    def fn(u, delta, A, B, C, D, z, bias):
        out, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, backend=backend)
        return out, last

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_large_delta_stays_finite(device, backend, dtype):
    # delta ~ softplus(40) ~ 40 and |A| up to ~10: exp(delta*A) underflows to 0, never overflows
    inputs = make_inputs(1, 8, 4096, 16, 4, dtype, device, delta_scale=80.0)
    u, delta, A, B, C, D, z, bias = inputs
    delta = (delta.float().abs() + 20).to(dtype)
    A = A * 5
    leaves = [t.detach().clone().requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias)]
    out = selective_scan(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7],
                         delta_softplus=True, backend=backend)
    assert torch.isfinite(out.float()).all()
    ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
    assert_close(out, ref, dtype)
    out.float().sum().backward()
    for name, leaf in zip(NAMES, leaves):
        assert torch.isfinite(leaf.grad.float()).all(), name


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length,chunk", [(12, 4), (12, 12), (12, 1), (30, 5)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_linear_scan_matches_loop(reverse, length, chunk, with_h0):
    g = torch.Generator().manual_seed(3)
    a = torch.rand(length, 3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(length, 3, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64) if with_h0 else None
    want = torch.empty_like(b)
    state = h0.clone() if with_h0 else torch.zeros(3, 5, dtype=torch.float64)
    steps = range(length - 1, -1, -1) if reverse else range(length)
    for t in steps:
        state = a[t] * state + b[t]
        want[t] = state
    h = b.clone()
    final = chunked_linear_scan_(a, h, chunk, h0=h0, reverse=reverse)
    torch.testing.assert_close(h, want)
    torch.testing.assert_close(final, want[0] if reverse else want[-1])


def test_input_errors_are_plain():
    u, delta, A, B, C, D, z, bias = make_inputs(2, 8, 10, 4, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="delta shape"):
        selective_scan(u, delta[..., :5], A, B, C)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(u, delta, A, B[:, :, :3], C)
    with pytest.raises(ValueError, match="dim % groups"):
        selective_scan(u, delta, A, torch.randn(2, 3, 4, 10), C)
    with pytest.raises(ValueError, match="complex A"):
        selective_scan(u, delta, A.to(torch.complex64), B, C)
    with pytest.raises(ValueError, match="D must be"):
        selective_scan(u, delta, A, B, C, D=D[:3])


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # with it, triton runs on CPU (tests/test_scan_triton.py)
    monkeypatch.delenv(SCAN_BACKEND_ENV, raising=False)
    # the compiled CPU kernel when it builds (a C compiler is on every supported machine), else torch
    auto = "cpu" if backend_unavailable_reason("cpu", "cpu") is None else "torch"
    assert auto == "cpu", backend_unavailable_reason("cpu", "cpu")
    assert resolve_backend(None, "cpu") == auto
    assert "torch" in available_backends("cpu") and "ref" in available_backends("cpu")
    monkeypatch.setenv(SCAN_BACKEND_ENV, "ref")
    assert resolve_backend(None, "cpu") == "ref"
    assert resolve_backend("torch", "cpu") == "torch"  # the argument wins over the environment
    monkeypatch.setenv(SCAN_BACKEND_ENV, "auto")
    assert resolve_backend(None, "cpu") == auto
    with pytest.raises(RuntimeError, match="unknown scan backend 'fast'"):
        resolve_backend("fast", "cpu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend("mamba_ssm", "cpu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend("triton", "cpu")
    with pytest.raises(RuntimeError, match="cpu backend needs CPU tensors"):
        resolve_backend("cpu", "cuda")


def test_env_backend_is_used(monkeypatch):
    calls = []
    import common.ops.dispatch as dispatch

    monkeypatch.setattr(dispatch, "selective_scan_ref", lambda *a: calls.append("ref") or a[0])
    monkeypatch.setenv(SCAN_BACKEND_ENV, "ref")
    u, delta, A, B, C, *_ = make_inputs(1, 4, 5, 2, 1, torch.float32, "cpu")
    selective_scan(u, delta, A, B, C)
    assert calls == ["ref"]


def _env_with_repo_on_path():
    paths = [os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def test_import_is_lazy():
    """Importing and using common on CPU loads none of the GPU packages (beyond what torch/MONAI load)."""
    code = textwrap.dedent(
        """
        import sys, json, torch, monai, monai.networks.layers
        gpu = ("mamba_ssm", "causal_conv1d", "triton")
        before = {m for m in gpu if m in sys.modules}
        import common, common.ops, common.networks
        from common.ops import selective_scan, available_backends
        available_backends("cpu")
        u = torch.randn(1, 4, 6)
        selective_scan(u, u, -torch.ones(4, 2), torch.randn(1, 2, 6), torch.randn(1, 2, 6))
        print(json.dumps(sorted({m for m in gpu if m in sys.modules} - before)))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=_env_with_repo_on_path())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_forward_backward_memory_is_bounded(backend):
    """L=4096, 4x192 channels, N=16: the float32 state tensor is 200 MB; an L x L matrix would be 50 GB."""
    code = textwrap.dedent(
        """
        import resource, sys, torch
        from common.ops import selective_scan
        torch.manual_seed(0)
        b, d, L, n = 1, 768, 4096, 16
        u = torch.randn(b, d, L, requires_grad=True); dl = torch.randn(b, d, L, requires_grad=True)
        A = -torch.rand(d, n) - 0.5; B = torch.randn(b, 4, n, L); C = torch.randn(b, 4, n, L)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = selective_scan(u, dl, A, B, C, torch.ones(d), None, torch.zeros(d), True, backend=sys.argv[1])
        out.sum().backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
        """
    )
    res = subprocess.run([sys.executable, "-c", code, backend], capture_output=True, text=True, check=True,
                         env=_env_with_repo_on_path())
    grown_mb = int(res.stdout.strip().splitlines()[-1])
    # inputs + grads + time-major copies are ~150 MB; the blocked scan adds tens of MB of workspace
    assert grown_mb < 400, f"forward+backward grew the process by {grown_mb} MB"


# ---------------------------------------------------------------- the compiled CPU kernel


def test_cpu_kernel_block_width():
    """Channels per task: the library's wide vector (16) where every block of 16 lies inside one B and
    one C group, else 8, else 1; float64 always 1."""
    from common.ops.scan_cpu import _lanes

    assert _lanes(64, 2, 0, torch.float32, 16) == 16  # 32 channels a group
    assert _lanes(48, 2, 2, torch.float32, 16) == 8  # 24 a group
    assert _lanes(48, 0, 3, torch.float32, 16) == 16  # B fixed, 16 a C group
    assert _lanes(40, 4, 4, torch.float32, 16) == 1  # 10 a group
    assert _lanes(64, 2, 2, torch.float32, 8) == 8  # a library without AVX-512
    assert _lanes(64, 0, 0, torch.float64, 16) == 1


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the cpu backend did not build here")
@pytest.mark.parametrize("dim,groups,b_form", [(48, 2, "grouped"), (48, 3, "fixed"), (40, 4, "grouped"),
                                               (16, 1, "shared"), (64, 2, "grouped")])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_channel_blocks_and_threads(dim, groups, b_form, threads):
    """Blocks of 16 channels on AVX-512 processors (48 / 3 groups, 16 shared, 64 / 2 groups) or 8
    (48 / 2 groups = 24 channels a group; every block lies inside one B and one C group), one channel
    per task otherwise (40 / 4 groups = 10 channels a group), any thread count: values and all
    gradients equal the reference."""
    inputs = make_inputs(3, dim, 150, 16, groups, torch.float32, "cpu", b_form=b_form, seed=4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def ours(*a):
            return selective_scan(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=a[8],
                                  return_last_state=a[9], backend="cpu")

        got = _grads(ours, inputs, NAMES, True)
        (out, last), (ref, ref_last) = run_both("cpu", inputs, last_state=True)
    finally:
        torch.set_num_threads(before)
    want = _grads(selective_scan_ref, inputs, NAMES, True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-5)
    for name in NAMES:
        scale = want[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(got[name] / scale, want[name] / scale, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def test_cpu_kernel_build_is_cached_and_failures_are_reported(tmp_path):
    """The kernel compiles once into the cache folder; a later process loads it without compiling.
    With no working compiler the backend says why, automatic choice falls back to torch, and asking for
    ``cpu`` by name raises that reason."""
    code = textwrap.dedent(
        """
        import glob, json, os, sys, torch
        from common.ops import resolve_backend, selective_scan
        from common.ops.scan_cpu import library_unavailable_reason
        reason = library_unavailable_reason()
        auto = resolve_backend(None, "cpu")
        try:
            resolve_backend("cpu", "cpu"); named = None
        except RuntimeError as err:
            named = str(err)
        libs = sorted(glob.glob(os.path.join(os.environ["MAMBA_BUNDLES_CACHE"], "*.so")))
        print(json.dumps([reason, auto, named, [(p, os.stat(p).st_mtime_ns) for p in libs]]))
        """
    )
    env = {**_env_with_repo_on_path(), "MAMBA_BUNDLES_CACHE": str(tmp_path / "cache")}
    env.pop(SCAN_BACKEND_ENV, None)
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      env=env).stdout.strip().splitlines()[-1]) for _ in range(2)]
    for reason, auto, named, libs in runs:
        assert reason is None and auto == "cpu" and named is None and len(libs) == 1
    assert runs[0][3] == runs[1][3]  # same file, not rebuilt
    assert not [p for p in os.listdir(tmp_path / "cache") if not p.endswith(".so")]  # no temporary left
    env = {**env, "MAMBA_BUNDLES_CACHE": str(tmp_path / "cache2"), "CC": "/bin/false"}
    reason, auto, named, libs = json.loads(subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1])
    assert "could not build the CPU scan kernel" in reason and auto == "torch" and libs == []
    assert "cannot use backend 'cpu'" in named and "could not build" in named
