"""The Triton selective scan (``backend="triton"``) against the sequential reference.

Without a GPU the kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set per test),
so the shapes stay tiny; with CUDA the same cases run compiled, plus a larger one.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from common.ops import resolve_backend, selective_scan, selective_scan_ref  # noqa: E402
from common.ops import scan_triton as st  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """On CPU: Triton's interpreter, and the module whose kernels it runs (for launch overrides)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = st if CUDA or st.INTERPRETED else st._interpreted_twin()
    yield mod
    mod.CONFIG_OVERRIDE.clear()


def make_inputs(batch, dim, length, n, *, b_shape, c_shape, dtype=torch.float32, seed=0, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    u = rnd(batch, dim, length).to(dtype)
    delta = (rnd(batch, dim, length, scale=0.5) * delta_scale).to(dtype)
    A = -torch.exp(rnd(dim, n, scale=0.5))
    B = rnd(*b_shape).to(dtype)
    C = rnd(*c_shape).to(dtype)
    D = rnd(dim)
    z = rnd(batch, dim, length).to(dtype)
    bias = rnd(dim, scale=0.5)
    if dtype == torch.float64:
        A, D, bias = A.double(), D.double(), bias.double()
    return [t.to(DEVICE) for t in (u, delta, A, B, C, D, z, bias)]


def forms(batch, dim, length, n, b_form, c_form):
    shape = {"fixed": (dim, n), "shared": (batch, n, length)}
    out = []
    for f in (b_form, c_form):
        out.append(shape[f] if f in shape else (batch, int(f[1:]), n, length))  # "g4": 4 groups
    return out


def outputs_and_grads(fn, inputs, *, with_d, with_z, with_bias, softplus, last_state):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    u, delta, A, B, C, D, z, bias = leaves
    res = fn(u, delta, A, B, C, D if with_d else None, z if with_z else None, bias if with_bias else None,
             softplus, last_state)
    out, last = res if last_state else (res, None)
    g = torch.Generator().manual_seed(1)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)).sum()
    if last_state:
        loss = loss + (last.double() * torch.randn(last.shape, generator=g, dtype=torch.float64).to(DEVICE)).sum()
    loss.backward()
    used = {"D": with_d, "z": with_z, "delta_bias": with_bias}
    vals = {"out": out.detach()} | ({"last": last.detach()} if last_state else {})
    for name, leaf in zip(NAMES, leaves):
        if used.get(name, True):
            vals["d" + name] = leaf.grad
        else:
            assert leaf.grad is None, name
    return vals


def triton_scan(*args):
    return selective_scan(*args, backend="triton")


def compare(got, want, dtype):
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2}[dtype]
    for name, w in want.items():
        x = got[name]
        assert x.dtype == w.dtype and x.shape == w.shape, name
        assert torch.isfinite(x.float()).all(), name
        # gradients are sums over many steps: compare relative to each tensor's scale
        scale = w.double().abs().max().clamp_min(1.0)
        torch.testing.assert_close(x.double() / scale, w.double() / scale, rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# (batch, dim, L, N, B form, C form, dtype, options, forced (BLOCK_D, BLOCK_L, num_warps) or None)
ALL = dict(with_d=True, with_z=True, with_bias=True, softplus=True, last_state=True)
NONE = dict(with_d=False, with_z=False, with_bias=False, softplus=False, last_state=False)
CASES = [
    pytest.param(2, 8, 1, 4, "g1", "g1", torch.float32, ALL, None, id="L1"),
    pytest.param(2, 8, 7, 16, "g4", "g4", torch.float32, NONE, None, id="L7-N16-bare"),
    pytest.param(2, 8, 37, 16, "g4", "g4", torch.float32, ALL, (2, 16, 4), id="ss2d-N16-3chunks"),
    pytest.param(2, 8, 64, 4, "g4", "g4", torch.float32, dict(ALL, last_state=False), (2, 16, 4), id="L64-4chunks"),
    pytest.param(2, 8, 100, 1, "shared", "shared", torch.float32, ALL, (8, 16, 4), id="L100-N1-shared"),
    pytest.param(2, 8, 33, 4, "g2", "g1", torch.float32, dict(ALL, with_z=False), (4, 16, 4), id="mixed-groups"),
    pytest.param(2, 8, 20, 3, "fixed", "g2", torch.float32, dict(ALL, softplus=False), None, id="fixed-B-N3"),
    pytest.param(2, 8, 20, 2, "g2", "fixed", torch.float32, ALL, (2, 16, 4), id="fixed-C"),
    pytest.param(2, 8, 30, 4, "g4", "g4", torch.bfloat16, ALL, (2, 16, 4), id="bf16"),
    pytest.param(1, 4, 19, 2, "g2", "g2", torch.float64, ALL, (2, 16, 4), id="fp64"),
]


@pytest.mark.parametrize("batch,dim,length,n,b_form,c_form,dtype,opts,config", CASES)
def test_matches_reference(interpreter, batch, dim, length, n, b_form, c_form, dtype, opts, config):
    if config is not None:
        interpreter.CONFIG_OVERRIDE.update(fwd=config, bwd=config)
    b_shape, c_shape = forms(batch, dim, length, n, b_form, c_form)
    inputs = make_inputs(batch, dim, length, n, b_shape=b_shape, c_shape=c_shape, dtype=dtype)
    if not opts["softplus"]:  # without softplus the caller keeps delta positive
        inputs[1] = inputs[1].abs() + 0.01
    got = outputs_and_grads(triton_scan, inputs, **opts)
    if dtype == torch.bfloat16:  # the reference on the same bf16-rounded inputs, in float64
        want = outputs_and_grads(selective_scan_ref, [t.double() for t in inputs], **opts)
        want = {k: v.to(got[k].dtype) for k, v in want.items()}
    else:
        want = outputs_and_grads(selective_scan_ref, inputs, **opts)
    compare(got, want, dtype)


# plane kernels for plain scans (time-varying B / C, N <= 4; opt-in: CONFIG_OVERRIDE["path"] = "plane"; the
# fused cross-scan's default, tests/test_cross_scan.py): (batch, dim, L, N, B form, C form,
# dtype, options, forced (chunk elements, num_warps) or None). Several channels per program with one group
# each (stored dB / dC), one channel of a group of 8 (atomics), rows of several lines and several
# chunks (the state and the adjoint carried between them), padded tails, N 2-4, shared B, z,
# last_state, float64, bf16.
PLANE_CASES = [
    pytest.param(2, 8, 37, 1, "g4", "g4", torch.float32, ALL, None, id="N1-groups-stored"),
    pytest.param(2, 8, 37, 1, "g1", "g2", torch.float32, NONE, (16, 4), id="N1-bare-atomics-chunks"),
    pytest.param(1, 8, 150, 2, "shared", "g2", torch.float32, ALL, (64, 2), id="N2-shared-B-lines-chunks"),
    pytest.param(2, 16, 5, 4, "g2", "g2", torch.float32, dict(ALL, with_z=False), None, id="N4-short"),
    pytest.param(1, 4, 19, 1, "g2", "g2", torch.float64, ALL, None, id="fp64"),
    pytest.param(2, 8, 30, 1, "g4", "g4", torch.bfloat16, ALL, None, id="bf16"),
]


@pytest.mark.parametrize("batch,dim,length,n,b_form,c_form,dtype,opts,config", PLANE_CASES)
def test_plane_kernels(interpreter, monkeypatch, batch, dim, length, n, b_form, c_form, dtype, opts, config):
    interpreter.CONFIG_OVERRIDE["path"] = "plane"
    if config is not None:
        interpreter.CONFIG_OVERRIDE["plane"] = config
    used = []
    real = interpreter._plane.plane_fwd
    monkeypatch.setattr(interpreter._plane, "plane_fwd", lambda *a: used.append(a[-2]) or real(*a))
    test_matches_reference(interpreter, batch, dim, length, n, b_form, c_form, dtype, opts, None)
    assert len(used) == 1 and used[0]["HP"] * used[0]["WP"] >= length
    if config is not None:
        assert used[0]["num_warps"] == config[1] and used[0]["nch_r"] > 1


def test_plane_kernels_apply_to_small_states(interpreter):
    cfg = interpreter._plane.plane_config
    # a plain row: a map of 64-step lines, walked in bands of 8 lines (512 elements)
    assert cfg(384, 384, 3136, 1, 96, None) == dict(BD=1, H=49, W=64, HP=64, WP=64, RB=8, CB=8, nch_r=7, nch_c=1,
                                                    NCHP=8, num_warps=8)
    assert cfg(1536, 1536, 196, 1, 384, None)["BD"] == 2  # short rows: two channels of a group per program
    assert cfg(3072, 3072, 49, 1, 768, None)["BD"] == 8
    assert cfg(3072, 3072, 49, 1, 4, None)["BD"] == 4  # never across a group
    # maps: bands of rows for the row-major orders, of columns for the column-major ones
    assert cfg(384, 96, 56 * 56, 1, 96, (56, 56)) == dict(BD=1, H=56, W=56, HP=64, WP=64, RB=8, CB=8, nch_r=7,
                                                          nch_c=7, NCHP=8, num_warps=8)
    assert cfg(384, 96, 5 * 100, 1, 96, (5, 100))["CB"] == 64
    assert cfg(384, 384, 64 * 512 + 1, 1, 96, None) is None  # more chunks than a program walks
    assert cfg(384, 96, 8192 * 2, 1, 96, (2, 8192)) is None  # a side over 4096
    assert cfg(384, 384, 100, 8, 96, None) is None  # N > 4: the step kernels
    assert cfg(384, 96, 120 * 256, 1, 96, (120, 256)) is None  # bands of 2 rows: the tile kernels
    assert cfg(384, 96, 120 * 256, 1, 96, (120, 256), override=(512, 8))["RB"] == 2  # unless forced
    # the dispatch: the fused cross-scan takes them unless the tile kernels are forced
    assert interpreter.plane_cross_scan_applies(96, 56, 56, 1)
    interpreter.CONFIG_OVERRIDE["path"] = "tile"
    assert not interpreter.plane_cross_scan_applies(96, 56, 56, 1)


# time-in-thread kernels (time-varying B / C, N >= 8): (BLOCK_L, LN, NW, cap) launch configurations,
# with the channel count and occupancy target that make the backward walk several channel blocks per
# program with atomics (2 groups; a group's channels > a program's span). The interpreter is slow, so
# CPU runs three; CUDA runs every configuration benchmarks/gpu/compare_scan.py sweeps.
TIME_CASES = [((8, 4, 1, 8), 64, 5), ((4, 1, 1, 8), 64, 5), ((16, 16, 1, 8), 16, 4)]
if CUDA:
    TIME_CASES += [(c, 64, 5) for c in [(2, 1, 1, 8), (8, 1, 1, 8), (4, 2, 1, 8), (8, 2, 1, 8), (16, 4, 1, 8),
                                        (4, 1, 2, 8), (8, 2, 2, 8), (8, 4, 1, 1), (16, 8, 1, 1)]]


@pytest.mark.parametrize("config,dim,min_programs", TIME_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_time_in_thread_configs(interpreter, config, dim, min_programs):
    interpreter.CONFIG_OVERRIDE.update(time=config, min_programs=min_programs, path="time")
    batch, length, n = 1, 2 * config[0] + 3, 16
    cfg = interpreter._time_in_thread_config(dim, n, dim // 2, batch, False, torch.device(DEVICE))
    assert cfg is not None and cfg["BLOCK_L"] == config[0]
    if config[1] > 1 and config[2] == 1:  # several programs share a group: atomics
        assert cfg["n_sub"] * cfg["BDP"] < dim // 2
    inputs = make_inputs(batch, dim, length, n, b_shape=(batch, 2, n, length), c_shape=(batch, 2, n, length))
    got = outputs_and_grads(triton_scan, inputs, **ALL)
    want = outputs_and_grads(selective_scan_ref, inputs, **ALL)
    compare(got, want, torch.float32)


# step kernels (the default for time-varying B / C, 8 <= N <= 32): (batch, dim, L, N, groups, options,
# STEP_CONFIG override). Partial chunks (L % 4), padded states (N 12), N 32, z, no D, one and two
# channel blocks per program, dB / dC summed by per-program partials and by atomics, the chunk states
# stored every 1, 2 (default) and 4 chunks, and the sequence split into time segments (a local pass,
# then each segment from the composed carry), forward and backward; the tiles' state axis as Triton
# >= 3.7 gets it (0) and, where marked, as 3.6 does (1); the forward's loads one chunk ahead
# (default) and, once, not; once under a register cap (a compile option, ignored by the interpreter).
STEP_CASES = [
    pytest.param(1, 16, 11, 16, 1, ALL, {}, id="z-L11"),
    pytest.param(2, 32, 9, 16, 2, dict(ALL, with_z=False), {"nsub": 1, "state_axis": 1}, id="groups-nsub1-partials"),
    pytest.param(1, 32, 8, 12, 1, NONE, {"dbc": "atomic"}, id="N12-bare-atomics"),
    pytest.param(1, 32, 6, 32, 1, dict(ALL, with_d=False), {}, id="N32-noD-nsub2"),
    # the state stored every chunk, and every 4th (the backward advances it over up to 3 chunks)
    pytest.param(1, 16, 21, 16, 1, dict(ALL, with_z=False), {"save_every": 1, "prefetch_fwd": False}, id="save-every-chunk"),
    pytest.param(1, 16, 21, 16, 1, dict(ALL, with_z=False), {"save_every": 4}, id="save-every-4th"),
    pytest.param(1, 16, 41, 16, 1, ALL, {"segs_fwd": 3, "segs_bwd": 3, "state_axis": 1}, id="segments-3"),
    pytest.param(2, 32, 37, 16, 2, dict(ALL, with_z=False), {"segs_fwd": 4, "segs_bwd": 2, "save_every": 1},
                 id="segments-groups-partials"),
    pytest.param(2, 16, 37, 12, 1, dict(NONE, last_state=True), {"segs_fwd": 3, "segs_bwd": 2, "nsub": 1},
                 id="segments-bare-N12"),
    # the backward's B / C reads and dB / dC writes one scalar per state and step (STEP_CONFIG["bwd_vec"] off;
    # the cases above run the 4-step vectors): partial chunks, padded states, one block per program with
    # partials, atomics, states every 4th chunk, time segments
    pytest.param(1, 16, 11, 16, 1, ALL, {"bwd_vec": False}, id="scalar-bwd-z-L11"),
    pytest.param(2, 32, 9, 12, 2, dict(ALL, with_z=False), {"bwd_vec": False, "nsub": 1, "state_axis": 1},
                 id="scalar-bwd-N12-groups-nsub1-partials"),
    pytest.param(1, 32, 10, 16, 2, NONE, {"bwd_vec": False, "dbc": "atomic", "save_every": 4},
                 id="scalar-bwd-atomics-every-4th"),
    pytest.param(2, 32, 37, 16, 1, dict(ALL, with_z=False), {"bwd_vec": False, "segs_fwd": 3, "segs_bwd": 2,
                                                             "store_dt": False}, id="scalar-bwd-segments-dt-recomputed"),
    # other channel blocks than 8, different in the forward and the backward (one pair per lane at 2 x 16)
    pytest.param(1, 32, 13, 16, 2, ALL, {"bd_fwd": 2, "bd_bwd": 4, "fwd_maxnreg": 104}, id="blocks-2-4-groups"),
    pytest.param(1, 32, 19, 16, 1, dict(ALL, with_z=False), {"bd_fwd": 16, "bd_bwd": 2, "segs_fwd": 2, "segs_bwd": 2},
                 id="blocks-16-2-segments"),
    # dt recomputed from delta in the backward instead of stored by the forward (store_dt off; the
    # bidirectional mode: tests/test_cross_scan.py)
    pytest.param(2, 16, 37, 16, 1, ALL, {"store_dt": False, "segs_fwd": 3, "segs_bwd": 2}, id="dt-recomputed-segments"),
    pytest.param(1, 32, 13, 12, 1, dict(NONE, last_state=True), {"store_dt": False, "nsub": 1},
                 id="dt-recomputed-bare"),
    # the parallel backward (STEP_CONFIG["bwd_par"]: time across the threads, states in sequence): several
    # blocks with a partial last one, two channels per program with groups and N 12, a block longer than
    # the sequence, states stored every 4th chunk; with z the step backward runs instead
    pytest.param(1, 16, 37, 16, 1, dict(ALL, with_z=False), {"bwd_par": True, "par_block": 32}, id="par-3blocks"),
    pytest.param(1, 16, 41, 12, 2, dict(NONE, last_state=True), {"bwd_par": True, "par_block": 32, "par_bdp": 2},
                 id="par-bdp2-groups-N12"),
    pytest.param(1, 16, 64, 16, 1, dict(ALL, with_z=False, last_state=False),
                 {"bwd_par": True, "par_block": 64, "par_warps": 2, "save_every": 4}, id="par-2warps-every-4th"),
    pytest.param(1, 16, 11, 16, 1, ALL, {"bwd_par": True}, id="par-z-falls-back"),
]


# and for N < 8 (STEP_CONFIG["small_n"]), in blocks of 32 / N channels: MSVM-UNet's N = 1, N = 2 and 3
STEP_CASES += [
    pytest.param(1, 64, 19, 1, 2, ALL, {"small_n": True}, id="N1-z-groups"),
    pytest.param(2, 64, 37, 1, 1, dict(ALL, with_z=False), {"small_n": True, "segs_fwd": 3, "segs_bwd": 2, "state_axis": 1},
                 id="N1-segments-nsub2"),
    pytest.param(1, 32, 10, 3, 1, dict(NONE, last_state=True), {"small_n": True, "state_axis": 1}, id="N3-padded-bare"),
    pytest.param(1, 32, 13, 2, 1, dict(ALL, with_z=False), {"small_n": True, "dbc": "atomic", "nsub": 1},
                 id="N2-atomics"),
]


@pytest.mark.parametrize("batch,dim,length,n,groups,opts,step", STEP_CASES)
def test_step_kernels(interpreter, batch, dim, length, n, groups, opts, step):
    interpreter.CONFIG_OVERRIDE.update(step=step, min_programs=1)
    cfg = interpreter._step_config(dim, length, n, dim // groups, batch, False, False, torch.device(DEVICE))
    small = 32 // (1 << (n - 1).bit_length())  # channels per block at N < 8
    block = small if small > 8 else step.get("bd_bwd", 8)  # of the backward
    nsub = step.get("nsub", 2 if (dim // groups) % (2 * block) == 0 else 1)
    assert cfg is not None and cfg["NSUB"] == nsub
    assert (cfg["BD"], cfg["BD_bwd"]) == ((small, small) if small > 8 else (step.get("bd_fwd", 8), block))
    assert cfg["dbc"] == step.get("dbc", "partial")
    assert (cfg["segs_fwd"], cfg["segs_bwd"]) == (step.get("segs_fwd", 1), step.get("segs_bwd", 1))
    par = interpreter._par_config(cfg, dim, length, n, opts["with_z"], batch, torch.device(DEVICE))
    assert bool(par) == (step.get("bwd_par") is True and not opts["with_z"])
    shape = (batch, groups, n, length)
    inputs = make_inputs(batch, dim, length, n, b_shape=shape, c_shape=shape)
    if not opts["softplus"]:
        inputs[1] = inputs[1].abs() + 0.01
    got = outputs_and_grads(triton_scan, inputs, **opts)
    want = outputs_and_grads(selective_scan_ref, inputs, **opts)
    compare(got, want, torch.float32)


@pytest.mark.parametrize("store_dt", [True, False])
def test_step_backward_keeps_delta_only_to_recompute_dt(interpreter, store_dt):
    # with dt stored by the forward (the default) the backward never reads delta, so the autograd
    # node does not keep it alive (2-4 bytes per channel and step of training memory)
    interpreter.CONFIG_OVERRIDE.update(step={"store_dt": store_dt})
    shape = (1, 1, 16, 9)
    inputs = make_inputs(1, 16, 9, 16, b_shape=shape, c_shape=shape)
    grads = []
    for fn in (interpreter.selective_scan_triton, selective_scan_ref):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves, True)
        if fn is not selective_scan_ref:
            assert (out.grad_fn.saved_tensors[1] is None) == store_dt
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype, device=out.device)).view_as(out))
        grads.append(leaves[1].grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_parallel_backward_bf16_default_blocks(interpreter):
    # bf16 inputs at the default blocks (256 steps, one warp, 8 steps a thread), in one partial block (the
    # carries between blocks: the float32 cases); against the float64 reference on the same bf16-rounded inputs
    interpreter.CONFIG_OVERRIDE.update(step={"bwd_par": True}, min_programs=1)
    cfg = interpreter._step_config(8, 200, 16, 8, 1, False, False, torch.device(DEVICE))
    assert interpreter._par_config(cfg, 8, 200, 16, False, 1, torch.device(DEVICE)) == (1, 256, 1)
    shape = (1, 1, 16, 200)
    inputs = make_inputs(1, 8, 200, 16, b_shape=shape, c_shape=shape, dtype=torch.bfloat16)
    opts = dict(ALL, with_z=False)
    got = outputs_and_grads(triton_scan, inputs, **opts)
    want = outputs_and_grads(selective_scan_ref, [t.double() for t in inputs], **opts)
    compare(got, {k: v.to(got[k].dtype) for k, v in want.items()}, torch.bfloat16)


def test_parallel_backward_policy(interpreter):
    # STEP_CONFIG["bwd_par"] = "auto" (the default): the parallel backward where the step backward's grid fills
    # the GPU badly, at L >= 1024 (an H100's 132 multiprocessors; the shapes timed on 2026-12-07)
    assert interpreter.STEP_CONFIG["bwd_par"] == "auto"
    wins = interpreter._par_wins
    assert wins(24 * 768 // 16, 4096, 132)  # Mamba-HUNet stage 1: 1152 programs, 1.09 waves
    assert wins(24 * 1536 // 16, 1024, 132)  # stage 2: 2.18 waves
    assert not wins(10 * 768 // 8, 12544, 132)  # MSSMamba level 1: 0.91 of one wave (one block a program)
    assert not wins(10 * 1536 // 16, 3136, 132)  # level 2: 0.91 of one wave
    assert not wins(24 * 3072 // 16, 256, 132)  # short sequences: the step backward
    cfg = interpreter._step_config(768, 4096, 16, 192, 24, False, False, torch.device("cpu"))
    assert interpreter._par_config(cfg, 768, 4096, 16, False, 24, torch.device("cpu")) is None  # CUDA only


def test_step_segments_policy(interpreter):
    # split where the channels give too few programs, by powers of two, never below min_seg chunks
    seg = interpreter._segments
    assert seg(1024, 100, 50, 32, 2) == (1, 1024)
    assert seg(1024, 100, 400, 32, 2) == (4, 256)
    assert seg(1024, 1, 10**6, 32, 2) == (32, 32)
    assert seg(11, 1, 10, 1, 2, forced=3) == (3, 4)  # segments of whole save_every groups
    assert seg(784, 96, 1056, 32, 2)[0] == 16
    # below the threshold, split up to the (higher) aim; at or above it, never
    assert seg(196, 384, 792, 16, 2, aim=1584) == (8, 26)
    assert seg(3136, 96, 792, 16, 2, aim=1584)[0] == 32
    assert seg(784, 1536, 792, 16, 2, aim=1584) == (1, 784)


def test_step_kernels_are_not_used_where_they_do_not_apply(interpreter):
    cfg = interpreter._step_config
    dev = torch.device(DEVICE)
    assert cfg(64, 100, 16, 64, 2, False, False, dev) is not None
    assert cfg(64, 100, 16, 64, 2, False, True, dev) is None  # fused cross-scan: time-in-thread kernels
    assert cfg(64, 100, 16, 64, 2, True, False, dev) is None  # a fixed B or C
    assert cfg(64, 100, 4, 64, 2, False, False, dev) is None  # N < 8: tile kernels
    assert cfg(12, 100, 16, 12, 2, False, False, dev) is None  # no 8-channel block fits
    interpreter.CONFIG_OVERRIDE["path"] = "time"
    assert cfg(64, 100, 16, 64, 2, False, False, dev) is None


@pytest.mark.parametrize("n", [12, 32])
def test_time_in_thread_padded_and_split_states(interpreter, n):
    # N = 12 pads to 16 (masked states); N = 32 splits a channel's states over two lanes (LN = 2)
    interpreter.CONFIG_OVERRIDE["path"] = "time"
    inputs = make_inputs(1, 32, 11, n, b_shape=(1, 1, n, 11), c_shape=(1, n, 11))
    assert interpreter._time_in_thread_config(32, n, 32, 1, False, torch.device(DEVICE)) is not None
    got = outputs_and_grads(triton_scan, inputs, **dict(ALL, with_z=False))
    want = outputs_and_grads(selective_scan_ref, inputs, **dict(ALL, with_z=False))
    compare(got, want, torch.float32)


def test_tile_path_is_used_where_time_in_thread_does_not_apply(interpreter):
    cfg = interpreter._time_in_thread_config
    assert cfg(64, 1, 64, 2, False, torch.device(DEVICE)) is None  # N = 1: tile kernels
    assert cfg(64, 16, 64, 2, True, torch.device(DEVICE)) is None  # a fixed B or C
    assert cfg(6, 16, 6, 2, False, torch.device(DEVICE)) is None  # no 8-channel block fits a group
    assert cfg(64, 64, 64, 2, False, torch.device(DEVICE)) is None  # N > 32


@pytest.mark.parametrize("path", ["tile", "plane"])
def test_large_delta_stays_finite(interpreter, path):
    if path == "tile":
        interpreter.CONFIG_OVERRIDE.update(fwd=(2, 16, 4), bwd=(2, 16, 4))
    else:
        interpreter.CONFIG_OVERRIDE.update(path="plane", plane=(32, 4))  # several chunks
    inputs = make_inputs(1, 4, 48, 4, b_shape=(1, 2, 4, 48), c_shape=(1, 2, 4, 48), delta_scale=80.0)
    inputs[1] = inputs[1].abs() + 20  # softplus(40) ~ 40, exp(delta * A) underflows to 0
    inputs[2] = inputs[2] * 5
    got = outputs_and_grads(triton_scan, inputs, **dict(ALL, last_state=False))
    want = outputs_and_grads(selective_scan_ref, inputs, **dict(ALL, last_state=False))
    compare(got, want, torch.float32)


@pytest.mark.parametrize("path", ["time", "step"])
def test_large_delta_stays_finite_n16(interpreter, path):
    if path == "time":
        interpreter.CONFIG_OVERRIDE["path"] = "time"
    inputs = make_inputs(1, 8, 20, 16, b_shape=(1, 1, 16, 20), c_shape=(1, 1, 16, 20), delta_scale=80.0)
    if path == "time":
        assert interpreter._time_in_thread_config(8, 16, 8, 1, False, torch.device(DEVICE)) is not None
    else:
        assert interpreter._step_config(8, 20, 16, 8, 1, False, False, torch.device(DEVICE)) is not None
    inputs[1] = inputs[1].abs() + 20
    inputs[2] = inputs[2] * 5
    got = outputs_and_grads(triton_scan, inputs, **dict(ALL, last_state=False))
    want = outputs_and_grads(selective_scan_ref, inputs, **dict(ALL, last_state=False))
    compare(got, want, torch.float32)


def test_no_grad_forward_and_state_only_gradient(interpreter):
    inputs = make_inputs(2, 8, 21, 4, b_shape=(2, 4, 4, 21), c_shape=(2, 4, 4, 21))
    with torch.no_grad():
        out, last = selective_scan(*inputs[:5], inputs[5], None, inputs[7], True, True, backend="triton")
        ref, ref_last = selective_scan_ref(*inputs[:5], inputs[5], None, inputs[7], True, True)
    compare({"out": out, "last": last}, {"out": ref, "last": ref_last}, torch.float32)
    # a loss on last_state alone: the output gradient arrives as None
    u = inputs[0].clone().requires_grad_(True)
    _, last = selective_scan(u, *inputs[1:5], return_last_state=True, backend="triton")
    last.sum().backward()
    u_ref = inputs[0].clone().requires_grad_(True)
    _, ref_last = selective_scan_ref(u_ref, *inputs[1:5], return_last_state=True)
    ref_last.sum().backward()
    compare({"du": u.grad}, {"du": u_ref.grad}, torch.float32)


@pytest.mark.skipif(CUDA, reason="the CPU interpreter path")
def test_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    assert resolve_backend(None, "cpu") == "cpu"  # the compiled kernel (tests/test_selective_scan.py checks it builds)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"
    assert resolve_backend(None, "cpu") == "cpu"  # the interpreter is never chosen automatically


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_is_the_automatic_choice_and_matches_at_ss2d_shape():
    assert resolve_backend(None, "cuda") == "triton"
    dim, length, n = 4 * 96, 1000, 16
    inputs = make_inputs(2, dim, length, n, b_shape=(2, 4, n, length), c_shape=(2, 4, n, length))
    got = outputs_and_grads(triton_scan, inputs, **ALL)
    want = outputs_and_grads(selective_scan_ref, inputs, **ALL)
    compare(got, want, torch.float32)
