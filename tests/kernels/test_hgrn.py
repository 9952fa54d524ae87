"""kernels/hgrn: the chunked parallel-scan recurrence against the token-by-token oracle, forward
and every gradient (f, c, initial state) under a random upstream gradient, odd shapes, gates at
the edges of (0, 1), half-precision inputs, and the one-token decoding path of the dispatcher."""

import pytest
import torch
from kernel_utils import assert_close_verbose

from kernels.hgrn import hgrn_chunked, hgrn_naive, hgrn_recurrence, hgrn_step


def _inputs(b, length, d, dtype=torch.float32, seed=0, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    f = (low + (high - low) * torch.rand(b, length, d, generator=g, dtype=torch.float64)).to(dtype)
    c = torch.randn(b, length, d, generator=g, dtype=torch.float64).to(dtype)
    h0 = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    return f, c, h0


def _run(fn, f, c, h0, grad_h, grad_final, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (f, c)] + \
        ([h0.detach().clone().requires_grad_()] if h0 is not None else [])
    h, final = fn(leaves[0], leaves[1], leaves[2] if h0 is not None else None, **kw)
    torch.autograd.backward([h, final], [grad_h.to(h.dtype), grad_final.to(final.dtype)])
    return h.detach(), final.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("length", [1, 2, 7, 63, 64, 100])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_the_oracle_forward_and_backward(length, chunk, with_state):
    f, c, h0 = _inputs(3, length, 60, seed=length + chunk)
    h0 = h0 if with_state else None
    g = torch.Generator().manual_seed(7)
    grad_h, grad_final = torch.randn(3, length, 60, generator=g), torch.randn(3, 60, generator=g)
    expected = _run(hgrn_naive, f, c, h0, grad_h, grad_final)
    actual = _run(hgrn_chunked, f, c, h0, grad_h, grad_final, chunk_size=chunk)
    assert_close_verbose("h", actual[0], expected[0], atol=1e-5, rtol=1e-5)
    assert_close_verbose("final state", actual[1], expected[1], atol=1e-5, rtol=1e-5)
    for name, a, e in zip(("grad f", "grad c", "grad initial_state"), actual[2], expected[2]):
        assert_close_verbose(name, a, e, atol=1e-5, rtol=1e-5)


def test_float64_is_exact_to_rounding():
    f, c, h0 = _inputs(2, 37, 5, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(2, 37, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    expected = _run(hgrn_naive, f, c, h0, *grads)
    actual = _run(hgrn_chunked, f, c, h0, *grads, chunk_size=8)
    for name, a, e in zip(("h", "final"), actual[:2], expected[:2]):
        assert_close_verbose(name, a, e)
    for name, a, e in zip(("grad f", "grad c", "grad h0"), actual[2], expected[2]):
        assert_close_verbose(name, a, e)


@pytest.mark.parametrize("low, high", [(0.0, 1e-30), (0.0, 0.0), (0.999, 1.0), (1.0, 1.0)])
def test_gates_at_the_edges_stay_finite_and_exact(low, high):
    """Gates of (or near) 0 and 1: no division by a product of gates, so nothing overflows."""
    f, c, h0 = _inputs(2, 50, 8, low=low, high=high)
    g = torch.Generator().manual_seed(1)
    grads = torch.randn(2, 50, 8, generator=g), torch.randn(2, 8, generator=g)
    expected = _run(hgrn_naive, f, c, h0, *grads)
    actual = _run(hgrn_chunked, f, c, h0, *grads, chunk_size=16)
    for t in (*actual[:2], *actual[2]):
        assert torch.isfinite(t).all()
    assert_close_verbose("h", actual[0], expected[0], atol=1e-4, rtol=1e-5)
    for name, a, e in zip(("grad f", "grad c", "grad h0"), actual[2], expected[2]):
        assert_close_verbose(name, a, e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_run_in_float32(dtype):
    f, c, h0 = _inputs(2, 33, 16)
    h_ref, final_ref = hgrn_naive(f.to(dtype).float(), c.to(dtype).float(), h0)
    h, final = hgrn_chunked(f.to(dtype), c.to(dtype), h0, chunk_size=8)
    assert h.dtype == dtype and final.dtype == torch.float32
    assert_close_verbose("final state", final, final_ref, atol=1e-5, rtol=1e-5)
    assert_close_verbose("h", h, h_ref.to(dtype), atol=1e-2, rtol=1e-2)


def test_dispatch_steps_one_token_and_scans_sequences():
    f, c, h0 = _inputs(2, 9, 6)
    h, final = hgrn_recurrence(f[:, :1], c[:, :1], h0)
    torch.testing.assert_close(final, hgrn_step(h0, f[:, 0], c[:, 0]), rtol=0, atol=0)
    torch.testing.assert_close(h[:, 0], final)
    # a sequence continued token by token from its prefix's final state is the whole sequence
    h_full, final_full = hgrn_recurrence(f, c, h0)
    h_head, state = hgrn_recurrence(f[:, :5], c[:, :5], h0)
    steps = [h_head]
    for t in range(5, 9):
        out, state = hgrn_recurrence(f[:, t:t + 1], c[:, t:t + 1], state)
        steps.append(out)
    assert_close_verbose("h (prefix + steps)", torch.cat(steps, 1), h_full)
    assert_close_verbose("final (prefix + steps)", state, final_full)


def test_an_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("WB_KERNELS", "cuda-please")
    f, c, _ = _inputs(1, 3, 2)
    with pytest.raises(ValueError, match="WB_KERNELS"):
        hgrn_recurrence(f, c)
