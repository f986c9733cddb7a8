"""The ``export`` scan (common/ops/scan_export.py): the sequential reference's numbers in a trace of
O(log L) operations that keeps the batch size free.

Values, options and gradients of every backend (``export`` included) against the reference are in
tests/test_selective_scan.py; here: the segment loop, the associative scan itself, and tracing."""

from __future__ import annotations

import warnings

import pytest
import torch

from common.ops import scan_export, selective_scan_ref
from common.ops.scan_export import associative_linear_scan, selective_scan_export


def _inputs(batch, dim, length, n, groups, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    A = -torch.exp(rnd(dim, n) * 0.5)
    return (rnd(batch, dim, length), rnd(batch, dim, length) * 0.5, A, rnd(batch, groups, n, length),
            rnd(batch, n, length), rnd(dim), rnd(batch, dim, length), rnd(dim) * 0.5)


@pytest.mark.parametrize("length", [1, 15, 16, 17, 100, 257])
def test_associative_scan_matches_the_loop(length):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 4, length, generator=g, dtype=torch.float64)
    b = torch.randn(3, 4, length, generator=g, dtype=torch.float64)
    prod, h = associative_linear_scan(a, b)
    state, p = torch.zeros(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
    for t in range(length):
        state, p = a[..., t] * state + b[..., t], p * a[..., t]
        torch.testing.assert_close(h[..., t], state)
        torch.testing.assert_close(prod[..., t], p)


@pytest.mark.parametrize("length", [5, 16, 48, 200, 333])
@pytest.mark.parametrize("segment_elements", [1 << 24, 8 * 3 * 16, 8 * 3 * 48])
def test_segments_carry_the_state(monkeypatch, length, segment_elements):
    """Sequences longer than one segment (forced small here) and lengths off the 16-step chunks give the
    reference's outputs, last state and gradients."""
    monkeypatch.setattr(scan_export, "_SEGMENT_ELEMENTS", segment_elements)
    leaves = [t.requires_grad_(True) for t in _inputs(2, 8, length, 3, 2)]
    u, delta, A, B, C, D, z, bias = leaves
    got = selective_scan_export(u, delta, A, B, C, D, z, bias, True, True)
    want = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    weights = [torch.randn_like(t) for t in want]
    grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), leaves)
             for out in (got, want)]
    for name, x, y in zip("u delta A B C D z bias".split(), *grads):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


def _trace(scan, u, delta, A, B, C, D, z, bias):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input checks become constants
        return torch.jit.trace(lambda u, delta, B, C, z: scan(u, delta, A, B, C, D, z, bias, True), (u, delta, B, C, z))


def test_trace_grows_with_log_length():
    """The trace holds about a thousand operations at any length (one segment); the sequential reference's
    grows by ~50 a step."""

    def nodes(scan, length):
        u, delta, A, B, C, D, z, bias = _inputs(1, 8, length, 4, 2, dtype=torch.float32)
        return len(list(_trace(scan, u, delta, A, B, C, D, z, bias).graph.nodes()))

    short, long = nodes(selective_scan_export, 64), nodes(selective_scan_export, 4096)
    assert long < 1.5 * short < nodes(selective_scan_ref, 64)


def test_trace_keeps_the_batch_free(monkeypatch):
    """A trace at batch 1, over two segments, runs batches of 1 and 3 with the reference's numbers."""
    monkeypatch.setattr(scan_export, "_SEGMENT_ELEMENTS", 8 * 4 * 512)  # segments of 512 steps
    u, delta, A, B, C, D, z, bias = _inputs(1, 8, 1000, 4, 2, dtype=torch.float32)
    traced = _trace(selective_scan_export, u, delta, A, B, C[:, None], D, z, bias)
    for batch in (1, 3):
        u, delta, _, B, C, _, z, _ = _inputs(batch, 8, 1000, 4, 2, seed=batch, dtype=torch.float32)
        torch.testing.assert_close(traced(u, delta, B, C[:, None], z),
                                   selective_scan_ref(u, delta, A, B, C[:, None], D, z, bias, True),
                                   rtol=1e-5, atol=1e-5)
