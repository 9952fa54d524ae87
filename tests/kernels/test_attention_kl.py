"""kernels/attention_kl: the naive oracle (float64) vs the query-block torch path vs the Triton
kernels (Triton's interpreter on CPU; conftest sets TRITON_INTERPRET=1). Loss, dq_s and dk_s
under a random upstream gradient; odd N/M, Ds != Dt, causal, key/query masks, strided inputs;
identities (KL = 0 at student == teacher, CE - KL = teacher entropy); dispatch; bad input."""

import logging

import pytest
import torch
from kernel_utils import assert_close_verbose, spy_dispatch

from kernels.attention_kl import attention_kl
from kernels.attention_kl.ref import attention_kl_naive, attention_kl_ref
from kernels.attention_kl.triton import attention_kl_triton

# (atol as a fraction of the largest |expected|, rtol) by input dtype, against a float64 oracle
# on the same (rounded) inputs. bf16: the loss is fp32 math, gradients are bf16 and dq/dk
# multiply a bf16-rounded score gradient.
TOL = {
    torch.float64: (1e-11, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1e-2, 2e-2),
}
PATHS = {
    "ref": lambda *a, **kw: attention_kl_ref(*a, block_rows=16, **kw),  # N=63: 4 blocks, a partial one
    # One 64 x 64 tile per (b, h) at N, M <= 64 keeps the interpreter fast; the tile loops and
    # partial tiles are exercised by test_triton_matches_oracle's smaller blocks.
    "triton": lambda *a, **kw: attention_kl_triton(*a, block_n=64, block_m=64, **kw),
}
B, H, N, M, DS, DT = 2, 3, 63, 63, 24, 40


def make_inputs(b=B, h=H, n=N, m=M, ds=DS, dt=DT, dtype=torch.float32, masked=False, strided=False, seed=0):
    """Student q/k (requiring grad), teacher q/k, and None or ragged key/query masks.

    With `masked`, the last item loses its first 5 keys (so its causal rows 0..4 see nothing)
    and some queries; with `strided`, tensors are (B, N, H, D) buffers viewed as (B, H, N, D).
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(rows, d):
        shape = (b, rows, h, d) if strided else (b, h, rows, d)
        x = torch.randn(*shape, generator=gen).to(dtype)
        return x.transpose(1, 2) if strided else x

    q_s, k_s = rand(n, ds).requires_grad_(), rand(m, ds).requires_grad_()
    q_t, k_t = 1.5 * rand(n, dt), rand(m, dt)  # a sharper teacher than student
    if strided:
        q_s, k_s = q_s.detach().requires_grad_(), k_s.detach().requires_grad_()
    key_mask = query_mask = None
    if masked:
        key_mask = torch.rand(b, m, generator=gen) > 0.3  # (B, M)
        key_mask[-1, :5] = False
        query_mask = torch.rand(b, n, generator=gen) > 0.2  # (B, N)
    return q_s, k_s, q_t, k_t, key_mask, query_mask


def loss_and_grads(fn, q_s, k_s, q_t, k_t, upstream, **kw):
    """fn's loss with dloss/dq_s and dloss/dk_s for the upstream gradient `upstream` (!= 1)."""
    q_s.grad = k_s.grad = None
    loss = fn(q_s, k_s, q_t, k_t, **kw)
    (loss * upstream).backward()
    return loss.detach(), q_s.grad.detach().clone(), k_s.grad.detach().clone()


def oracle(q_s, k_s, q_t, k_t, upstream, **kw):
    """The naive definition in float64 on the same (possibly rounded) values."""
    q64, k64 = (x.detach().double().requires_grad_() for x in (q_s, k_s))
    return loss_and_grads(attention_kl_naive, q64, k64, q_t.double(), k_t.double(), upstream, **kw)


def assert_matches(path, q_s, k_s, q_t, k_t, upstream=-0.7, **kw):
    got = loss_and_grads(PATHS[path], q_s, k_s, q_t, k_t, upstream, **kw)
    want = oracle(q_s, k_s, q_t, k_t, upstream, **kw)
    atol, rtol = TOL[q_s.dtype]
    assert got[1].dtype == q_s.dtype and got[2].dtype == k_s.dtype
    for name, a, e in zip(("loss", "dq_s", "dk_s"), got, want):
        assert_close_verbose(f"{path} {name} {kw}", a, e, atol=atol * e.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("kind", ["kl", "ce"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_ref_matches_oracle_float64(kind, causal, masked):
    q_s, k_s, q_t, k_t, key_mask, query_mask = make_inputs(dtype=torch.float64, masked=masked)
    assert_matches("ref", q_s, k_s, q_t, k_t, kind=kind, causal=causal, key_mask=key_mask, query_mask=query_mask)


def test_ref_float32_and_default_block():
    q_s, k_s, q_t, k_t, key_mask, query_mask = make_inputs(m=41, masked=True)
    kw = dict(kind="kl", key_mask=key_mask, query_mask=query_mask)
    assert_matches("ref", q_s, k_s, q_t, k_t, **kw)
    default = attention_kl_ref(q_s, k_s, q_t, k_t, **kw)  # one block here
    blocked = PATHS["ref"](q_s, k_s, q_t, k_t, **kw)
    assert_close_verbose("ref default block loss", default, blocked, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind, causal, masked, strided, blocks", [
    ("kl", False, True, False, (32, 32)),  # 2 x 2 tiles, the second ones partial
    ("ce", True, True, True, (32, 16)),  # causal bound inside a query block; strided inputs
    ("kl", True, False, False, (16, 32)),  # key tiles wider than query tiles
])
def test_triton_matches_oracle(kind, causal, masked, strided, blocks):
    q_s, k_s, q_t, k_t, key_mask, query_mask = make_inputs(masked=masked, strided=strided)
    got = loss_and_grads(
        attention_kl_triton, q_s, k_s, q_t, k_t, -0.7, block_n=blocks[0], block_m=blocks[1],
        kind=kind, causal=causal, key_mask=key_mask, query_mask=query_mask,
    )
    want = oracle(q_s, k_s, q_t, k_t, -0.7, kind=kind, causal=causal, key_mask=key_mask, query_mask=query_mask)
    atol, rtol = TOL[torch.float32]
    for name, a, e in zip(("loss", "dq_s", "dk_s"), got, want):
        assert_close_verbose(f"triton {name} {blocks}", a, e, atol=atol * e.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_triton_rectangular(kind):
    """N != M (cross attention), Ds != Dt, one tile per (b, h)."""
    q_s, k_s, q_t, k_t, key_mask, query_mask = make_inputs(n=37, m=50, masked=True)
    assert_matches("triton", q_s, k_s, q_t, k_t, kind=kind, key_mask=key_mask, query_mask=query_mask)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(path, dtype):
    q_s, k_s, q_t, k_t, key_mask, query_mask = make_inputs(b=1, dtype=dtype, masked=True)
    loss = PATHS[path](q_s, k_s, q_t, k_t, key_mask=key_mask)
    assert loss.dtype == torch.float32  # the loss is accumulated in float32
    assert_matches(path, q_s, k_s, q_t, k_t, kind="kl", causal=True, key_mask=key_mask, query_mask=query_mask)


@pytest.mark.parametrize("path", list(PATHS))
def test_self_relation_shares_one_tensor(path):
    """MiniLMv2's V-V relation passes the same tensor as query and key; both gradients add up."""
    _, _, _, _, key_mask, _ = make_inputs(masked=True)
    gen = torch.Generator().manual_seed(3)
    v_s = torch.randn(B, H, N, DS, generator=gen, requires_grad=True)
    v_t = torch.randn(B, H, N, DT, generator=gen)
    loss = PATHS[path](v_s, v_s, v_t, v_t, key_mask=key_mask)
    (grad,) = torch.autograd.grad(loss * 0.3, v_s)
    v64 = v_s.detach().double().requires_grad_()
    want = attention_kl_naive(v64, v64, v_t.double(), v_t.double(), key_mask=key_mask)
    (want_grad,) = torch.autograd.grad(want * 0.3, v64)
    assert_close_verbose(f"{path} self-relation loss", loss, want, atol=2e-5 * want.item(), rtol=1e-4)
    atol = 2e-5 * want_grad.abs().max().item()
    assert_close_verbose(f"{path} self-relation grad", grad, want_grad, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_student_equal_to_teacher_gives_zero_kl_and_zero_grads(path, kind):
    """Same tensors and scales: KL is exactly 0 and, for both kinds, the gradient p_s - p_t too."""
    q_s, k_s, _, _, key_mask, query_mask = make_inputs(ds=DS, dt=DS, masked=True)
    loss, dq, dk = loss_and_grads(PATHS[path], q_s, k_s, q_s.detach(), k_s.detach(), 2.3,
                                  kind=kind, causal=True, key_mask=key_mask, query_mask=query_mask)
    if kind == "kl":
        assert abs(loss.item()) < 1e-6, loss
    assert dq.abs().max() < 1e-7 and dk.abs().max() < 1e-7


@pytest.mark.parametrize("path", ["naive", *PATHS])
def test_ce_minus_kl_is_teacher_entropy(path):
    fn = attention_kl_naive if path == "naive" else PATHS[path]
    q_s, k_s, q_t, k_t, key_mask, _ = make_inputs(dtype=torch.float64 if path != "triton" else torch.float32)
    key_mask = torch.ones(B, M, dtype=torch.bool)
    key_mask[:, -7:] = False  # padding keys: the teacher distribution lives on the first M-7
    kw = dict(causal=False, key_mask=key_mask)
    gap = fn(q_s, k_s, q_t, k_t, kind="ce", **kw) - fn(q_s, k_s, q_t, k_t, kind="kl", **kw)
    p_t = torch.softmax(DT**-0.5 * q_t.double() @ k_t[:, :, :-7].double().transpose(-1, -2), dim=-1)  # (B, H, N, M-7)
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    tol = 1e-10 if path != "triton" else 1e-5
    assert_close_verbose(f"{path} CE - KL", gap.double(), entropy, atol=tol, rtol=tol)


def test_key_and_query_masks_equal_dropping_them():
    """A False key is the same as removing that key; a False query the same as removing the row."""
    q_s, k_s, q_t, k_t, key_mask, query_mask = make_inputs(b=1, dtype=torch.float64, masked=True)
    keys, rows = key_mask[0], query_mask[0]
    want = attention_kl_naive(q_s[:, :, rows], k_s[:, :, keys], q_t[:, :, rows], k_t[:, :, keys])
    for name, fn in [("naive", attention_kl_naive), *PATHS.items()]:
        q, k = (q_s, k_s) if name != "triton" else (q_s.float(), k_s.float())
        got = fn(q, k, q_t.to(q.dtype), k_t.to(q.dtype), key_mask=key_mask, query_mask=query_mask)
        tol = 1e-12 if name != "triton" else 1e-5
        assert_close_verbose(f"{name} masked loss", got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("path", ["naive", *PATHS])
def test_rows_without_visible_keys_are_not_counted_and_none_gives_exact_zero(path):
    fn = attention_kl_naive if path == "naive" else PATHS[path]
    q_s, k_s, q_t, k_t, _, _ = make_inputs(b=2, h=1, n=20, m=20)
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[1, :6] = False  # causal rows 0..5 of item 1 see no key: left out, not NaN
    loss = fn(q_s, k_s, q_t, k_t, causal=True, key_mask=key_mask)
    query_mask = torch.ones(2, 20, dtype=torch.bool)
    query_mask[1, :6] = False
    same = fn(q_s, k_s, q_t, k_t, causal=True, key_mask=key_mask, query_mask=query_mask)
    assert torch.isfinite(loss) and abs(loss.item() - same.item()) < 1e-6

    q_s.grad = k_s.grad = None
    nothing = fn(q_s, k_s, q_t, k_t, key_mask=torch.zeros(2, 20, dtype=torch.bool))
    assert nothing.item() == 0.0 and nothing.requires_grad
    (nothing * 3.0).backward()
    assert torch.count_nonzero(q_s.grad) == 0 and torch.count_nonzero(k_s.grad) == 0


@pytest.mark.parametrize("path", list(PATHS))
def test_explicit_scales_and_teacher_gets_no_gradient(path):
    q_s, k_s, q_t, k_t, _, _ = make_inputs(b=1, h=2, n=33, m=33)
    q_t.requires_grad_()
    kw = dict(scale_s=0.3, scale_t=0.05)
    got = loss_and_grads(PATHS[path], q_s, k_s, q_t, k_t, 1.3, **kw)
    want = oracle(q_s, k_s, q_t, k_t, 1.3, **kw)
    assert q_t.grad is None
    for name, a, e in zip(("loss", "dq_s", "dk_s"), got, want):
        assert_close_verbose(f"{path} scaled {name}", a, e, atol=2e-5 * e.abs().max().item(), rtol=1e-4)


@pytest.fixture
def spies(monkeypatch):
    """Record which path the public function takes (the real functions still run)."""
    return spy_dispatch(monkeypatch, "attention_kl")


@pytest.mark.parametrize("setting, path", [("ref", "ref"), ("triton", "triton"), ("auto", "ref")])
def test_dispatch_follows_wb_kernels(monkeypatch, caplog, spies, setting, path):
    monkeypatch.setenv("WB_KERNELS", setting)
    q_s, k_s, q_t, k_t, _, _ = make_inputs(b=1, h=1, n=16, m=16)
    with caplog.at_level(logging.INFO, logger="kernels"):
        first = attention_kl(q_s, k_s, q_t, k_t)
        second = attention_kl(q_s, k_s, q_t, k_t)
    assert spies == [path, path]
    assert torch.equal(first, second)
    assert len([r for r in caplog.records if "attention_kl: using" in r.getMessage()]) == 1  # logged once


def test_forced_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("WB_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q_s, k_s, q_t, k_t, _, _ = make_inputs(b=1, h=1, n=16, m=16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention_kl(q_s, k_s, q_t, k_t)


@pytest.mark.parametrize("setting", ["ref", "triton"])
@pytest.mark.parametrize("change, words", [
    (lambda q_s, k_s, q_t, k_t, km, qm: dict(k_s=k_s[..., :-1]), ["k_s", "(2, 3, 63, 23)", "(2, 3, 63, 24)"]),
    (lambda q_s, k_s, q_t, k_t, km, qm: dict(k_t=k_t[..., :-1]), ["k_t", "(2, 3, 63, 40)"]),
    (lambda q_s, k_s, q_t, k_t, km, qm: dict(q_t=q_t[:1]), ["q_t", "(2, 3, 63, 40)"]),
    (lambda q_s, k_s, q_t, k_t, km, qm: dict(q_s=q_s[0]), ["q_s", "(B, H, rows, D)"]),
    (lambda q_s, k_s, q_t, k_t, km, qm: dict(k_s=k_s[:, :, 1:], k_t=k_t[:, :, 1:], causal=True),
     ["causal", "N=63", "M=62"]),
    (lambda q_s, k_s, q_t, k_t, km, qm: dict(key_mask=km[:, :-1]), ["key_mask", "(2, 63)"]),
    (lambda q_s, k_s, q_t, k_t, km, qm: dict(query_mask=qm.float()), ["query_mask", "bool"]),
    (lambda q_s, k_s, q_t, k_t, km, qm: dict(k_s=k_s.double()), ["q_s", "k_s", "float64"]),
    (lambda q_s, k_s, q_t, k_t, km, qm: dict(kind="js"), ["kind", "'js'"]),
])
def test_bad_input_names_the_tensor(monkeypatch, setting, change, words):
    monkeypatch.setenv("WB_KERNELS", setting)
    q_s, k_s, q_t, k_t, km, qm = make_inputs(masked=True)
    args = dict(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t, key_mask=km, query_mask=qm)
    args.update(change(q_s, k_s, q_t, k_t, km, qm))
    with pytest.raises(ValueError) as info:
        attention_kl(args.pop("q_s"), args.pop("k_s"), args.pop("q_t"), args.pop("k_t"), **args)
    for word in words:
        assert word in str(info.value), info.value


def test_triton_refuses_float64():
    q_s, k_s, q_t, k_t, _, _ = make_inputs(b=1, h=1, n=16, m=16, dtype=torch.float64)
    with pytest.raises(ValueError, match="WB_KERNELS=ref"):
        attention_kl_triton(q_s, k_s, q_t, k_t)


@pytest.mark.slow
def test_ref_path_memory_is_a_fraction_of_naive():
    """Peak memory of forward + backward in fresh processes (the benchmark's worker) at a ViT-B
    shape: the naive path holds several (1, 12, 2304, 2304) float32 tensors (243 MiB each),
    the block path a few (1, 12, 75, 2304) tiles."""
    from workbench.bench import run_worker

    spec = dict(op="attention_kl", case="12 heads x 64", shape=dict(B=1, H=12, N=2304, D=64))
    peaks = {}
    for path in ("naive", "ours"):
        result = run_worker("workbench.bench.kernels", {**spec, "path": path}, timeout=300)
        assert result.error is None, result.error
        peaks[path] = result.data["peak_mib"]
    assert peaks["naive"] > 4 * 243, peaks
    assert peaks["ours"] < peaks["naive"] / 8, peaks
