"""kernels/relation_loss: the naive oracle (float64) vs the tiled torch path vs the Triton kernels
(Triton's interpreter on CPU; conftest sets TRITON_INTERPRET=1), loss and dX_s under a random
upstream gradient; odd shapes, Ds != Dt, ragged masks; identities; dispatch; bad input."""

import logging

import pytest
import torch
from kernel_utils import assert_close_verbose, spy_dispatch

from kernels.relation_loss import relation_loss
from kernels.relation_loss.ref import relation_loss_naive, relation_loss_ref
from kernels.relation_loss.triton import relation_loss_triton

KINDS = ("cosine", "mse")
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}
# (atol as a fraction of the largest |expected|, rtol) by input dtype. bf16 inputs are compared
# with an oracle on the same rounded values: the sums are fp32-exact, dX_s is rounded to bf16.
TOL = {torch.float64: (1e-11, 1e-9), torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2)}
PATHS = {
    "ref": lambda x_s, x_t, **kw: relation_loss_ref(x_s, x_t, tile=16, **kw),  # N=63: 4 tiles, a partial one
    "triton": lambda x_s, x_t, **kw: relation_loss_triton(x_s, x_t, block_n=32, **kw),
}


def make_inputs(batch, n, width_s, width_t, dtype=torch.float32, masked=False, seed=0):
    """Student (requires grad), teacher, and None or a mask whose valid counts differ per item
    (the last item has none, so it must drop out of the mean)."""
    gen = torch.Generator().manual_seed(seed)
    x_s = torch.randn(batch, n, width_s, generator=gen).to(dtype).requires_grad_()
    x_t = torch.randn(batch, n, width_t, generator=gen).to(dtype)
    mask = None
    if masked:
        keep_rate = torch.linspace(0.9, 0.3, batch)[:, None]  # (B, 1)
        mask = torch.rand(batch, n, generator=gen) < keep_rate  # (B, N)
        mask[-1] = False
    return x_s, x_t, mask


def loss_and_grad(fn, x_s, x_t, mask, kind, upstream):
    """fn's loss and dloss/dx_s for the upstream gradient `upstream` (a scalar != 1)."""
    x_s.grad = None
    loss = fn(x_s, x_t, kind=kind, mask=mask)
    (loss * upstream).backward()
    return loss.detach(), x_s.grad.detach().clone()


def oracle(x_s, x_t, mask, kind, upstream):
    """The naive definition in float64 on the same (possibly rounded) values."""
    xs = x_s.detach().double().requires_grad_()
    return loss_and_grad(relation_loss_naive, xs, x_t.double(), mask, kind, upstream)


def assert_matches(path, x_s, x_t, mask, kind, upstream=1.7):
    loss, grad = loss_and_grad(PATHS[path], x_s, x_t, mask, kind, upstream)
    want_loss, want_grad = oracle(x_s, x_t, mask, kind, upstream)
    atol, rtol = TOL[x_s.dtype]
    assert grad.dtype == x_s.dtype
    assert_close_verbose(f"{path} {kind} loss", loss, want_loss, atol=atol * want_loss.abs().item(), rtol=rtol)
    grad_atol = atol * want_grad.abs().max().item()
    assert_close_verbose(f"{path} {kind} grad x_s", grad, want_grad, atol=grad_atol, rtol=rtol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape, masked", [((2, 37, 24, 24), False), ((4, 63, 60, 20), True)], ids=["plain", "masked"])
def test_ref_matches_oracle(kind, dtype, shape, masked):
    x_s, x_t, mask = make_inputs(*shape, dtype=dtype, masked=masked)
    assert_matches("ref", x_s, x_t, mask, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_triton_matches_oracle(kind, dtype, masked):
    x_s, x_t, mask = make_inputs(3, 63, 60, 40, dtype=dtype, masked=masked)
    assert_matches("triton", x_s, x_t, mask, kind, upstream=-0.6)


@pytest.mark.parametrize("path", list(PATHS))
def test_bf16_student_fp32_teacher(path):
    x_s, x_t, mask = make_inputs(2, 37, 24, 12, masked=True)
    assert_matches(path, x_s.detach().bfloat16().requires_grad_(), x_t, mask, "cosine")


def test_mask_drops_rows_and_columns():
    """A masked item equals the unmasked loss over its valid tokens only; the mean skips empty items."""
    x_s, x_t, mask = make_inputs(4, 20, 8, 6, dtype=torch.float64, masked=True)
    for kind in KINDS:
        per_item = [relation_loss_naive(x_s[b, mask[b]][None], x_t[b, mask[b]][None], kind=kind)
                    for b in range(3)]  # item 3 has no valid token
        want = torch.stack(per_item).mean()
        for name, fn in [("naive", relation_loss_naive), *PATHS.items()]:
            got = fn(x_s, x_t, kind=kind, mask=mask)
            assert_close_verbose(f"{name} {kind} masked loss", got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("path", ["naive", *PATHS])
def test_all_tokens_masked_gives_exact_zero(path):
    fn = relation_loss_naive if path == "naive" else PATHS[path]
    x_s, x_t, _ = make_inputs(2, 19, 16, 8)
    for kind in KINDS:
        x_s.grad = None
        loss = fn(x_s, x_t, kind=kind, mask=torch.zeros(2, 19, dtype=torch.bool))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.count_nonzero(x_s.grad) == 0


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", KINDS)
def test_zero_when_student_is_teacher(path, kind):
    x_s, _, mask = make_inputs(3, 37, 16, 16, dtype=torch.float64, masked=True)
    x_t = x_s.detach().clone()
    loss, grad = loss_and_grad(PATHS[path], x_s, x_t, mask, kind, upstream=2.3)
    assert abs(loss.item()) < 1e-12, loss
    assert grad.abs().max() < 1e-10  # a minimum: zero gradient too


@pytest.mark.parametrize("path", list(PATHS))
def test_cosine_invariant_to_feature_scale(path):
    """RDist compares relation shapes only: scaling x_s or x_t uniformly leaves it unchanged."""
    x_s, x_t, mask = make_inputs(2, 37, 24, 12, dtype=torch.float64, masked=True)
    base = PATHS[path](x_s, x_t, kind="cosine", mask=mask)
    scaled = PATHS[path](3.7 * x_s, 0.2 * x_t, kind="cosine", mask=mask)
    assert_close_verbose(f"{path} scaled loss", scaled, base, atol=1e-13, rtol=1e-11)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", KINDS)
def test_invariant_to_rotating_the_feature_axis(path, kind):
    """G = X X^T is unchanged by X -> X Q for orthogonal Q, on either side."""
    x_s, x_t, mask = make_inputs(2, 37, 24, 12, dtype=torch.float64, masked=True)
    gen = torch.Generator().manual_seed(1)
    q_s = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))[0]
    q_t = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))[0]
    base = PATHS[path](x_s, x_t, kind=kind, mask=mask)
    rotated = PATHS[path](x_s @ q_s, x_t @ q_t, kind=kind, mask=mask)
    assert_close_verbose(f"{path} {kind} rotated loss", rotated, base, atol=1e-12 * base.abs().item(), rtol=1e-10)


@pytest.mark.parametrize("path", list(PATHS))
def test_teacher_gets_no_gradient(path):
    x_s, x_t, _ = make_inputs(2, 19, 16, 8)
    x_t.requires_grad_()
    PATHS[path](x_s, x_t, kind="mse").backward()
    assert x_t.grad is None and x_s.grad is not None


@pytest.fixture
def spies(monkeypatch):
    """Record which path the public function takes (the real functions still run)."""
    return spy_dispatch(monkeypatch, "relation_loss")


@pytest.mark.parametrize("setting, path", [("ref", "ref"), ("triton", "triton"), ("auto", "ref")])
def test_dispatch_follows_wb_kernels(monkeypatch, caplog, spies, setting, path):
    monkeypatch.setenv("WB_KERNELS", setting)
    x_s, x_t, _ = make_inputs(2, 19, 16, 8)
    with caplog.at_level(logging.INFO, logger="kernels"):
        first = relation_loss(x_s, x_t)
        second = relation_loss(x_s, x_t)
    assert spies == [path, path]
    assert torch.equal(first, second)
    assert len([r for r in caplog.records if "relation_loss: using" in r.getMessage()]) == 1  # logged once


def test_forced_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("WB_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x_s, x_t, _ = make_inputs(2, 19, 16, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        relation_loss(x_s, x_t)


@pytest.mark.parametrize("setting", ["ref", "triton"])
@pytest.mark.parametrize("change, words", [
    (lambda x_s, x_t, m: (x_s, x_t[:, :-1], m, "cosine"), ["x_s", "x_t", "(B, N)"]),
    (lambda x_s, x_t, m: (x_s[0], x_t[0], m, "cosine"), ["x_s", "x_t", "(B, N, D)"]),
    (lambda x_s, x_t, m: (x_s, x_t, m[:, :-1], "cosine"), ["mask", "(B, N)"]),
    (lambda x_s, x_t, m: (x_s, x_t, m.float(), "cosine"), ["mask", "bool"]),
    (lambda x_s, x_t, m: (x_s, x_t, m, "l1"), ["kind", "'l1'"]),
])
def test_bad_input_names_the_tensor(monkeypatch, setting, change, words):
    monkeypatch.setenv("WB_KERNELS", setting)
    x_s, x_t, mask = make_inputs(2, 19, 16, 8, masked=True)
    a, b, m, kind = change(x_s, x_t, mask)
    with pytest.raises(ValueError) as info:
        relation_loss(a, b, kind=kind, mask=m)
    for word in words:
        assert word in str(info.value), info.value


@pytest.mark.slow
def test_ref_path_memory_is_a_fraction_of_naive():
    """Peak memory of forward + backward in fresh processes (the benchmark's worker): the tiled
    path holds blocks, the naive one two (B, N, N) Gram matrices and their gradients."""
    from workbench.bench import run_worker

    spec = dict(op="relation_loss", case="cosine, 12 heads x 64", shape=dict(B=4, N=1152, D=32))
    peaks = {}
    for path in ("naive", "ours"):
        result = run_worker("workbench.bench.kernels", {**spec, "path": path}, timeout=300)
        assert result.error is None, result.error
        peaks[path] = result.data["peak_mib"]
    assert peaks["naive"] > 40  # two 20 MiB Gram matrices at least
    assert peaks["ours"] < peaks["naive"] / 4, peaks
