"""The Triton kernels compiled for CUDA (not the interpreter) against the torch references, in
float32, bfloat16 and float16: loss and every gradient. Run by `bash .ci/gpu` (`pytest -m gpu`
with TRITON_INTERPRET=0); skipped without CUDA.

The reference runs on the same inputs upcast to float32, so a half-precision kernel is held
to the per-dtype tolerances of `kernel_utils.TOLERANCES` against exact arithmetic.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernel_utils import assert_close_verbose, tolerance

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="native kernels: run with TRITON_INTERPRET=0 (bash .ci/gpu)")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _leaves(*tensors: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.detach().to("cuda", dtype).requires_grad_(t.requires_grad) for t in tensors]


def _run(monkeypatch, path: str, fn, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    monkeypatch.setenv("WB_KERNELS", path)
    for t in inputs:
        t.grad = None
    loss = fn(*inputs)
    loss.backward()
    return loss.detach(), [t.grad for t in inputs]


def _compare(monkeypatch, name: str, fn, cpu_inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    native = _leaves(*cpu_inputs, dtype=dtype)
    reference = _leaves(*cpu_inputs, dtype=torch.float32)
    loss, grads = _run(monkeypatch, "triton", fn, native)
    loss_ref, grads_ref = _run(monkeypatch, "ref", fn, reference)
    atol, rtol = tolerance(dtype)
    assert_close_verbose(f"{name} loss ({dtype})", loss.float(), loss_ref, atol=atol, rtol=rtol)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        if g_ref is not None:
            assert_close_verbose(f"{name} grad {i} ({dtype})", g.float(), g_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_fused_linear_kd_native(monkeypatch, dtype, kind):
    from kernels.fused_linear_kd import fused_linear_kd

    g = torch.Generator().manual_seed(0)
    n, h, v = 300, 64, 1000
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h**-0.5).requires_grad_()
    teacher = torch.randn(n, v, generator=g) * 2
    labels = torch.where(torch.rand(n, generator=g) < 0.2, -100, 1)
    _compare(monkeypatch, f"fused_linear_kd/{kind}",
             lambda x, w, t: fused_linear_kd(x, w, t, labels=labels.cuda(), kind=kind, temperature=2.0, chunk_size=128),
             [hidden, weight, teacher], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_kl_native(monkeypatch, dtype, causal):
    from kernels.attention_kl import attention_kl

    g = torch.Generator().manual_seed(1)
    b, heads, n, ds, dt = 2, 3, 130, 32, 64
    q_s, k_s = (torch.randn(b, heads, n, ds, generator=g).requires_grad_() for _ in range(2))
    q_t, k_t = (torch.randn(b, heads, n, dt, generator=g) for _ in range(2))
    key_mask = torch.ones(b, n, dtype=torch.bool)
    key_mask[1, -17:] = False
    _compare(monkeypatch, f"attention_kl/causal={causal}",
             lambda qs, ks, qt, kt: attention_kl(qs, ks, qt, kt, causal=causal, key_mask=key_mask.cuda()),
             [q_s, k_s, q_t, k_t], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_relation_loss_native(monkeypatch, dtype, kind):
    from kernels.relation_loss import relation_loss

    g = torch.Generator().manual_seed(2)
    x_s = torch.nn.functional.normalize(torch.randn(4, 200, 48, generator=g), dim=-1).requires_grad_()
    x_t = torch.nn.functional.normalize(torch.randn(4, 200, 96, generator=g), dim=-1)
    mask = torch.ones(4, 200, dtype=torch.bool)
    mask[2, 150:] = False
    _compare(monkeypatch, f"relation_loss/{kind}", lambda s, t: relation_loss(s, t, kind=kind, mask=mask.cuda()),
             [x_s, x_t], dtype)
