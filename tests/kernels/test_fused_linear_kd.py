"""fused_linear_kd: the chunked torch path and the Triton path (interpreter on CPU) vs the oracle.

The oracle `fused_linear_kd_naive` builds the full logits and calls losses/logit.py. Shapes
are odd (N=37, H=24, V=131) with chunk_size=8, so every run has several chunks and a ragged
last one; every fourth row is ignored and carries a junk top-k (repeated id 0).
"""

from __future__ import annotations

import logging

import pytest
import torch
from kernel_utils import assert_close_verbose

import kernels
from kernels.fused_linear_kd import fused_linear_kd
from kernels.fused_linear_kd.ref import fused_linear_kd_naive, fused_linear_kd_ref
from kernels.fused_linear_kd.triton import fused_linear_kd_triton
from losses.logit import cross_entropy

N, H, V, K, CHUNK = 37, 24, 131, 7, 8
N_TRITON = 21  # the interpreter's cost grows with rows: still 15 kept rows = chunks of 8 and 7
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0), ("tvd", 0.5)]
KIND_IDS = [f"{kind}-b{beta}" if kind == "jsd" else kind for kind, beta in KINDS]
# (atol, rtol) of a path against the oracle at the inputs' dtype. bf16 is compared with a
# float32 oracle on the same (rounded) values: the bf16 matmuls are the error.
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-6, 2e-4), torch.bfloat16: (2e-2, 5e-2)}
UPSTREAM = 1.7  # grad_output != 1: backward must scale the gradients stored by the forward
PATHS = {"ref": fused_linear_kd_ref, "triton": fused_linear_kd_triton}


def make_case(
    dtype: torch.dtype = torch.float64,
    sparse: bool = False,
    rest: bool = True,
    bias: bool = True,
    temperature: float = 1.0,
    k: int = K,
    n: int = N,
    seed: int = 0,
) -> tuple[dict, dict]:
    """Leaf tensors (hidden, weight, bias) and the rest of the call's keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)  # (N, H)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 * H**-0.5  # (V, H) logits of scale ~2
    leaves = {"hidden": hidden, "weight": weight}
    if bias:
        leaves["bias"] = torch.randn(V, generator=g, dtype=torch.float64) * 0.5  # (V,)
    teacher = torch.randn(n, V, generator=g, dtype=torch.float64) * 2  # (N, V)
    labels = torch.randint(0, V, (n,), generator=g)  # (N,)
    labels[::4] = -100
    kwargs: dict = {"labels": labels, "temperature": temperature, "chunk_size": CHUNK}
    if not sparse:
        kwargs["teacher_logits"] = teacher.to(dtype)
        return {name: x.to(dtype) for name, x in leaves.items()}, kwargs
    scaled = teacher / temperature  # (N, V)
    ids = scaled.topk(k, dim=-1).indices  # (N, K)
    ids[labels == -100] = 0  # ignored rows: junk ids that must be neither validated nor read
    logp = scaled.log_softmax(-1).gather(1, ids)  # (N, K)
    kwargs.update(topk_ids=ids, topk_logp=logp.to(dtype))
    if rest:
        # exact log mass outside the top-k, as the teacher cache stores it
        rest_logp = scaled.scatter(1, ids, float("-inf")).logsumexp(-1) - scaled.logsumexp(-1)  # (N,)
        kwargs["rest_logp"] = rest_logp.to(dtype)
    return {name: x.to(dtype) for name, x in leaves.items()}, kwargs


def run(fn, leaves: dict, kwargs: dict, upstream: float = UPSTREAM) -> dict:
    """Loss and gradients of every leaf after backward of upstream * loss."""
    params = {name: x.detach().clone().requires_grad_() for name, x in leaves.items()}
    bias = params.get("bias")
    loss = fn(params["hidden"], params["weight"], kwargs.get("teacher_logits"), bias=bias,
              **{k: v for k, v in kwargs.items() if k != "teacher_logits"})
    (loss * upstream).backward()
    return {"loss": loss.detach(), **{f"grad {name}": p.grad for name, p in params.items()}}


def assert_results_close(label: str, got: dict, want: dict, dtype: torch.dtype) -> None:
    """Every entry of `want` (loss and gradients) against `got`, at `dtype`'s tolerance."""
    atol, rtol = TOL[dtype]
    assert got.keys() == want.keys(), f"{label}: {sorted(got)} != {sorted(want)}"
    for name, expected in want.items():
        # bf16 rounding scales with the tensor: there atol is relative to its largest entry
        scale = expected.abs().max().item() if dtype == torch.bfloat16 else 1.0
        assert_close_verbose(f"{name} ({label})", got[name], expected, atol * scale, rtol)


# ---------------------------------------------------------------- the torch path vs the oracle


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("kind", "beta"), KINDS, ids=KIND_IDS)
def test_ref_dense_matches_oracle_float64(kind, beta, temperature):
    leaves, kwargs = make_case(temperature=temperature)
    kwargs.update(kind=kind, beta=beta)
    want = run(fused_linear_kd_naive, leaves, kwargs)
    assert_results_close("ref dense", run(fused_linear_kd_ref, leaves, kwargs), want, torch.float64)


@pytest.mark.parametrize("rest", [True, False], ids=["rest_logp", "no_rest"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("kind", "beta"), KINDS, ids=KIND_IDS)
def test_ref_sparse_matches_oracle_float64(kind, beta, temperature, rest):
    leaves, kwargs = make_case(sparse=True, rest=rest, temperature=temperature)
    kwargs.update(kind=kind, beta=beta)
    want = run(fused_linear_kd_naive, leaves, kwargs)
    assert_results_close("ref sparse", run(fused_linear_kd_ref, leaves, kwargs), want, torch.float64)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_ref_float32_and_no_bias(sparse):
    leaves, kwargs = make_case(torch.float32, sparse=sparse, bias=False, temperature=2.0)
    kwargs.update(kind="jsd", beta=0.3)
    got = run(fused_linear_kd_ref, leaves, kwargs)
    assert got["loss"].dtype == torch.float32 and got["grad hidden"].dtype == torch.float32
    assert_results_close("ref float32", got, run(fused_linear_kd_naive, leaves, kwargs), torch.float32)


# ---------------------------------------------------------------- the Triton path vs the oracle


# Every kind at tau = 2; tau = 1 for the four divergences only (the interpreter is slow).
TRITON_DENSE = [(kind, beta, 2.0) for kind, beta in KINDS] + [
    (kind, beta, 1.0) for kind, beta in KINDS if not (kind == "jsd" and beta in (0.0, 1.0, 0.1))
]


@pytest.mark.parametrize(("kind", "beta", "temperature"), TRITON_DENSE, ids=lambda v: str(v))
def test_triton_dense_matches_oracle(kind, beta, temperature):
    leaves, kwargs = make_case(torch.float32, temperature=temperature, n=N_TRITON)
    kwargs.update(kind=kind, beta=beta)
    want = run(fused_linear_kd_naive, leaves, kwargs)
    assert_results_close("triton dense", run(fused_linear_kd_triton, leaves, kwargs), want, torch.float32)


@pytest.mark.parametrize("rest", [True, False], ids=["rest_logp", "no_rest"])
@pytest.mark.parametrize(("kind", "beta"), KINDS, ids=KIND_IDS)
def test_triton_sparse_matches_oracle(kind, beta, rest):
    leaves, kwargs = make_case(torch.float32, sparse=True, rest=rest, temperature=2.0, n=N_TRITON)
    kwargs.update(kind=kind, beta=beta)
    want = run(fused_linear_kd_naive, leaves, kwargs)
    assert_results_close("triton sparse", run(fused_linear_kd_triton, leaves, kwargs), want, torch.float32)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_triton_no_bias(sparse):
    leaves, kwargs = make_case(torch.float32, sparse=sparse, bias=False)
    kwargs.update(kind="reverse_kl")
    got = run(fused_linear_kd_triton, leaves, kwargs)
    assert "grad bias" not in got
    assert_results_close("triton no bias", got, run(fused_linear_kd_naive, leaves, kwargs), torch.float32)


@pytest.mark.parametrize(("kind", "sparse"), [("forward_kl", False), ("jsd", False), ("tvd", True)])
def test_triton_several_vocabulary_blocks(monkeypatch, kind, sparse):
    # V = 131 fits one block by default; 32-wide blocks exercise the online log-sum-exp
    # across blocks and a ragged last block.
    import kernels.fused_linear_kd.triton as triton_path

    monkeypatch.setattr(triton_path, "MAX_BLOCK_V", 32)
    leaves, kwargs = make_case(torch.float32, sparse=sparse, temperature=2.0)
    kwargs.update(kind=kind, beta=0.3)
    want = run(fused_linear_kd_naive, leaves, kwargs)
    assert_results_close("triton 32-wide blocks", run(fused_linear_kd_triton, leaves, kwargs), want, torch.float32)


# ---------------------------------------------------------------- dtypes, reductions, identities


@pytest.mark.parametrize("path", ["ref", "triton"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_bfloat16_inputs_vs_float32_oracle(path, sparse):
    leaves, kwargs = make_case(torch.bfloat16, sparse=sparse, temperature=2.0)
    kwargs.update(kind="forward_kl")
    got = run(PATHS[path], leaves, kwargs)
    assert got["loss"].dtype == torch.float32
    assert all(got[f"grad {name}"].dtype == torch.bfloat16 for name in leaves)
    upcast = {name: x.float() for name, x in leaves.items()}
    up_kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    assert_results_close(f"{path} bf16", got, run(fused_linear_kd_naive, upcast, up_kwargs), torch.bfloat16)


@pytest.mark.parametrize("path", ["ref", "triton"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_reduction_sum_is_mean_times_kept_rows(path, sparse):
    leaves, kwargs = make_case(torch.float32, sparse=sparse)
    kwargs.update(kind="tvd", reduction="sum")
    got = run(PATHS[path], leaves, kwargs)
    assert_results_close(f"{path} sum", got, run(fused_linear_kd_naive, leaves, kwargs), torch.float32)
    mean = run(PATHS[path], leaves, {**kwargs, "reduction": "mean"})
    n_kept = int((kwargs["labels"] != -100).sum())
    assert_close_verbose("sum / kept rows", got["loss"] / n_kept, mean["loss"], 1e-6, 1e-5)
    assert_close_verbose("grad weight sum / kept rows", got["grad weight"] / n_kept, mean["grad weight"], 1e-7, 1e-4)


@pytest.mark.parametrize("path", ["naive", "ref", "triton"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_all_rows_ignored_gives_attached_zero(path, sparse):
    leaves, kwargs = make_case(torch.float32, sparse=sparse)
    kwargs["labels"] = torch.full((N,), -100)
    if sparse:
        kwargs["topk_ids"] = torch.zeros_like(kwargs["topk_ids"])  # never read
    fn = {"naive": fused_linear_kd_naive, **PATHS}[path]
    got = run(fn, leaves, kwargs)
    assert got["loss"].item() == 0.0
    for name in leaves:
        assert torch.equal(got[f"grad {name}"], torch.zeros_like(leaves[name])), name


@pytest.mark.parametrize("path", ["ref", "triton"])
def test_one_hot_top1_forward_kl_is_cross_entropy(path):
    # K = 1 at the label with log p = 0 and no rest mass: KL(onehot || p_S) = -log p_S(label).
    leaves, kwargs = make_case(torch.float32)
    labels = kwargs["labels"]
    targets = labels.clamp(min=0)  # (N,) ignored rows get a valid id they never use
    kwargs = dict(labels=labels, topk_ids=targets[:, None], topk_logp=torch.zeros(N, 1),
                  rest_logp=torch.full((N,), float("-inf")), kind="forward_kl", chunk_size=CHUNK)
    got = run(PATHS[path], leaves, kwargs)

    def ce(hidden, weight, _teacher, *, bias, labels, **_):
        return cross_entropy(hidden @ weight.T + bias, labels.clamp(min=0), mask=labels != -100)

    assert_results_close(f"{path} CE identity", got, run(ce, leaves, kwargs), torch.float32)


@pytest.mark.parametrize("path", ["ref", "triton"])
@pytest.mark.parametrize(("kind", "beta"), [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)])
def test_teacher_equal_to_student_gives_zero(path, kind, beta):
    leaves, kwargs = make_case(torch.float32, temperature=2.0, n=N_TRITON)
    kwargs.update(kind=kind, beta=beta)
    kwargs["teacher_logits"] = leaves["hidden"] @ leaves["weight"].T + leaves["bias"]  # (N, V)
    got = run(PATHS[path], leaves, kwargs)
    assert abs(got["loss"].item()) < 1e-5
    for name in leaves:
        if kind == "tvd":  # every |p_S - p_T| is rounding-level: a tie, sign 0 (TVD_TIE_RTOL)
            assert not got[f"grad {name}"].any(), name
        else:
            assert got[f"grad {name}"].abs().max().item() < 1e-5, name


@pytest.mark.parametrize("path", ["ref", "triton"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "tvd"])
def test_teacher_with_minus_inf_logits(path, kind):
    # A teacher that rules tokens out (-inf) gives p_T = 0 there: 0 * log 0 = 0, no NaN.
    leaves, kwargs = make_case(torch.float32, n=N_TRITON)
    kwargs["teacher_logits"][:, ::3] = float("-inf")
    kwargs.update(kind=kind, beta=0.3)
    got = run(PATHS[path], leaves, kwargs)
    assert all(torch.isfinite(x).all() for x in got.values())
    assert_results_close(f"{path} -inf teacher", got, run(fused_linear_kd_naive, leaves, kwargs), torch.float32)


@pytest.mark.parametrize("path", ["ref", "triton"])
def test_full_topk_equals_dense(path):
    # K = V: the K + 1 outcomes are the whole vocabulary, so the sparse loss is the dense one.
    tau = 2.0
    leaves, kwargs = make_case(torch.float32, temperature=tau)
    teacher = kwargs.pop("teacher_logits")
    kwargs.update(kind="jsd", beta=0.4)
    dense = run(PATHS[path], leaves, {**kwargs, "teacher_logits": teacher})
    ids = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(i)) for i in range(N)])  # (N, V)
    logp = (teacher / tau).log_softmax(-1).gather(1, ids)  # (N, V)
    sparse = run(PATHS[path], leaves, {**kwargs, "topk_ids": ids, "topk_logp": logp})
    assert_results_close(f"{path} K = V", sparse, dense, torch.float32)


def test_gradients_only_where_required_and_none_without_grad_mode():
    leaves, kwargs = make_case(torch.float32)
    hidden = leaves["hidden"].clone().requires_grad_()
    weight = leaves["weight"]  # frozen head
    teacher = kwargs.pop("teacher_logits").requires_grad_()  # detached inside all the same
    loss = fused_linear_kd_ref(hidden, weight, teacher, **kwargs)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None and teacher.grad is None
    with torch.no_grad():
        again = fused_linear_kd_ref(hidden, weight, teacher, **kwargs)
    assert not again.requires_grad and again.item() == pytest.approx(loss.item())


def test_default_chunk_size_is_one_chunk_for_a_small_vocabulary():
    leaves, kwargs = make_case(torch.float64, sparse=True)
    kwargs.update(kind="reverse_kl", chunk_size=None)
    assert_results_close("ref default chunk", run(fused_linear_kd_ref, leaves, kwargs),
                         run(fused_linear_kd_naive, leaves, kwargs), torch.float64)


# ---------------------------------------------------------------- dispatch and errors


@pytest.fixture
def fresh_announcements(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_announced", set())
    caplog.set_level(logging.INFO, logger="kernels")
    return caplog


@pytest.mark.parametrize(("setting", "path"), [("ref", "torch (ref)"), ("auto", "torch (ref)"), ("triton", "triton")])
def test_dispatch_follows_wb_kernels(monkeypatch, fresh_announcements, setting, path):
    monkeypatch.setenv("WB_KERNELS", setting)
    leaves, kwargs = make_case(torch.float32)
    kwargs.update(kind="forward_kl")
    got = run(fused_linear_kd, leaves, kwargs)
    assert f"fused_linear_kd: using the {path} path" in fresh_announcements.text
    assert_results_close(f"dispatch {setting}", got, run(fused_linear_kd_naive, leaves, kwargs), torch.float32)
    fresh_announcements.clear()
    run(fused_linear_kd, leaves, kwargs)
    assert "fused_linear_kd" not in fresh_announcements.text  # announced once per process


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WB_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    leaves, kwargs = make_case(torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_linear_kd(leaves["hidden"], leaves["weight"], kwargs["teacher_logits"])


def _bad_calls():
    h, w = torch.randn(5, 4), torch.randn(9, 4)
    t = torch.randn(5, 9)
    ids, logp = torch.tensor([[0, 1]] * 5), torch.zeros(5, 2)
    return [
        ("no teacher", (h, w, None), {}, "exactly one teacher"),
        ("two teachers", (h, w, t), dict(topk_ids=ids, topk_logp=logp), "exactly one teacher"),
        ("ids without logp", (h, w, None), dict(topk_ids=ids), "both topk_ids and topk_logp"),
        ("hidden width", (torch.randn(5, 3), w, t), {}, r"hidden \(5, 3\), weight \(9, 4\)"),
        ("teacher shape", (h, w, torch.randn(5, 8)), {}, r"teacher_logits \(5, 8\)"),
        ("bias shape", (h, w, t), dict(bias=torch.randn(8)), r"bias \(8,\)"),
        ("labels shape", (h, w, t), dict(labels=torch.zeros(4, dtype=torch.long)), r"labels \(4,\)"),
        ("rest with dense", (h, w, t), dict(rest_logp=torch.zeros(5)), "rest_logp"),
        ("topk rows", (h, w, None), dict(topk_ids=ids[:4], topk_logp=logp[:4]), r"topk_ids \(4, 2\)"),
        ("topk vs logp", (h, w, None), dict(topk_ids=ids, topk_logp=logp[:, :1]), r"topk_logp \(5, 1\)"),
        ("rest shape", (h, w, None), dict(topk_ids=ids, topk_logp=logp, rest_logp=torch.zeros(4)), r"rest_logp \(4,\)"),
        ("K > V", (h, w, None), dict(topk_ids=torch.zeros(5, 10, dtype=torch.long), topk_logp=torch.zeros(5, 10)), "K = 10"),
        ("float ids", (h, w, None), dict(topk_ids=ids.float(), topk_logp=logp), "integer"),
        ("id out of range", (h, w, None), dict(topk_ids=ids + 8, topk_logp=logp), r"\[0, 9\)"),
        ("repeated id", (h, w, None), dict(topk_ids=torch.zeros(5, 2, dtype=torch.long), topk_logp=logp), "distinct"),
        ("kind", (h, w, t), dict(kind="kl"), "unknown divergence"),
        ("temperature", (h, w, t), dict(temperature=0.0), "temperature"),
        ("beta", (h, w, t), dict(kind="jsd", beta=1.5), "beta"),
        ("reduction", (h, w, t), dict(reduction="none"), "reduction"),
        ("chunk", (h, w, t), dict(chunk_size=0), "chunk_size"),
    ]


@pytest.mark.parametrize("path", ["ref", "triton"])
@pytest.mark.parametrize(("args", "kwargs", "match"), [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise_value_errors_naming_the_tensors(path, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PATHS[path](*args, **kwargs)


def test_float32_tvd_gradient_is_as_precise_as_autograd():
    """Against a float64 oracle, the memory-flat torch path's float32 TVD gradients are within
    2x of autograd's float32 error (its centring sum of +-p/2 terms cancels: summed pairwise)."""
    from losses.logit import TVD_TIE_RTOL

    gen = torch.Generator().manual_seed(3)
    n, h, v, tau = 48, 64, 5003, 2.0
    hidden, weight = torch.randn(n, h, generator=gen, dtype=torch.float64), torch.randn(v, h, generator=gen) / 8
    teacher = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    weight = weight.double()

    def ties(dtype):  # which classes count as ties depends on rounding only at the 1e-4 boundary
        p_s = torch.softmax((hidden @ weight.T).to(dtype) / tau, -1)
        p_t = torch.softmax(teacher.to(dtype) / tau, -1)
        return (p_s - p_t).abs() <= TVD_TIE_RTOL * torch.maximum(p_s, p_t)

    assert torch.equal(ties(torch.float64), ties(torch.float32))  # no boundary case: errors are rounding alone

    def grads(fn, dtype):
        x, w = hidden.to(dtype).detach().requires_grad_(True), weight.to(dtype).detach().requires_grad_(True)
        fn(x, w, teacher.to(dtype), kind="tvd", temperature=tau, chunk_size=16).backward()
        return x.grad.double(), w.grad.double()

    oracle = grads(fused_linear_kd_naive, torch.float64)
    autograd, ours = grads(fused_linear_kd_naive, torch.float32), grads(fused_linear_kd_ref, torch.float32)
    for name, a, o, ref in zip(("hidden", "weight"), autograd, ours, oracle):
        err_autograd, err_ours = ((a - ref).norm() / ref.norm()).item(), ((o - ref).norm() / ref.norm()).item()
        assert err_ours <= 2 * err_autograd, f"grad {name}: {err_ours:.2e} vs autograd {err_autograd:.2e}"
