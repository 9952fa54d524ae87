"""The Mamba-2 mixer: chunked SSD scan vs the sequential recurrence, decoding steps vs the
full scan, parity with transformers' Mamba2 (an independent implementation), and the
A = 0 identity with causal linear attention that the attention initialisation relies on."""

import logging

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.ssd import scan_backend, ssd_chunked, ssd_recurrent, ssd_scan, ssd_step
from students.mamba2 import GatedRMSNorm, Mamba2Config, Mamba2Mixer


def _inputs(b, length, h, p, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, h, p, generator=g, dtype=dtype)
    dt = torch.rand(b, length, h, generator=g, dtype=dtype) * 0.5 + 0.01
    A = -torch.rand(h, generator=g, dtype=dtype) * 3 - 0.1
    B = torch.randn(b, length, h, n, generator=g, dtype=dtype)
    C = torch.randn(b, length, h, n, generator=g, dtype=dtype)
    s0 = torch.randn(b, h, p, n, generator=g, dtype=dtype)
    return x, dt, A, B, C, s0


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("length", [1, 7, 16, 37])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_scan_equals_recurrence(dtype, tol, length, chunk):
    x, dt, A, B, C, s0 = _inputs(2, length, 3, 4, 5, dtype)
    for init in (None, s0):
        y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, init)
        y, s = ssd_chunked(x, dt, A, B, C, chunk, init)
        assert y.dtype == dtype and y.shape == x.shape
        assert _rel(y, y_ref) < tol and _rel(s, s_ref) < tol


def test_chunked_scan_is_differentiable_like_the_recurrence():
    x, dt, A, B, C, s0 = _inputs(1, 11, 2, 3, 4, torch.float64)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C)]
    y, _ = ssd_chunked(x, dt, A, B, C, 4)
    grads = torch.autograd.grad((y * torch.cos(y)).sum(), leaves)
    y_ref, _ = ssd_recurrent(x, dt, A, B, C)
    grads_ref = torch.autograd.grad((y_ref * torch.cos(y_ref)).sum(), leaves)
    for g, g_ref in zip(grads, grads_ref):
        assert _rel(g, g_ref) < 1e-10


def test_step_is_one_token_of_the_recurrence():
    x, dt, A, B, C, s0 = _inputs(2, 1, 3, 4, 5, torch.float64)
    y, s = ssd_step(s0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    decay = torch.exp(dt[:, 0] * A)[..., None, None]
    expected = s0 * decay + dt[:, 0, :, None, None] * x[:, 0, :, :, None] * B[:, 0, :, None, :]
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(y, (expected * C[:, 0, :, None, :]).sum(-1))


def _mixer(**kw):
    cfg = dict(d_model=16, n_heads=4, head_dim=8, d_state=6, n_x_heads=2, n_b_groups=2, n_c_groups=4, chunk_size=8,
               norm_group_size=8)
    cfg.update(kw)
    torch.manual_seed(0)
    return Mamba2Mixer(Mamba2Config(**cfg)).double()


@pytest.mark.parametrize("layout", ["fused", "split"])
def test_decoding_steps_equal_the_full_scan(layout):
    m = _mixer(layout=layout)
    u = torch.randn(2, 21, 16, dtype=torch.float64)
    y, final = m(u)
    state, ys = None, []
    for t in range(u.shape[1]):
        y_t, state = m(u[:, t:t + 1], state)
        ys.append(y_t)
    assert _rel(torch.cat(ys, 1), y) < 1e-10
    assert _rel(state.ssm, final.ssm) < 1e-10
    assert state.conv.shape == (2, m.config.conv_dim, m.config.d_conv - 1)
    # a prefill of 13 tokens then a chunk of 8: the state carries through the conv and the scan
    y1, s1 = m(u[:, :13])
    y2, s2 = m(u[:, 13:], s1)
    assert _rel(torch.cat([y1, y2], 1), y) < 1e-10 and _rel(s2.ssm, final.ssm) < 1e-10


def test_parity_with_transformers_mamba2():
    from transformers import Mamba2Config as HFConfig
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer

    torch.manual_seed(0)
    hf_cfg = HFConfig(hidden_size=32, num_heads=8, head_dim=8, state_size=16, n_groups=2, conv_kernel=4, expand=2,
                      chunk_size=8, use_bias=False, use_conv_bias=True, vocab_size=10, num_hidden_layers=1)
    ref = HFMixer(hf_cfg, layer_idx=0)
    with torch.no_grad():
        ref.A_log.copy_(torch.randn(8))
        ref.D.copy_(torch.randn(8))
        ref.norm.weight.copy_(torch.rand(64) + 0.5)
    ours = Mamba2Mixer(Mamba2Config(d_model=32, n_heads=8, head_dim=8, d_state=16, n_b_groups=2, n_c_groups=2,
                                    chunk_size=8, norm_group_size=32))
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, same [z, x, B, C, dt] layout
    u = torch.randn(2, 21, 32)
    with torch.no_grad():
        expected = ref(u)
        got, _ = ours(u)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_with_a_zero_the_mixer_is_causal_linear_attention():
    """A = 0, fixed dt, identity conv, no gate, no D: y_t = dt * sum_{s<=t} (q_t . k_s) v_s
    with q, k, v the (SiLU'd) C, B, x projections - before the norm and out_proj."""
    m = _mixer(gate=False, use_D=False, d_conv=2, layout="split")
    c = m.config
    with torch.no_grad():
        m.A_log.fill_(float("-inf"))  # A = -exp(-inf) = 0
        m.dt_proj.weight.zero_()
        m.dt_bias.fill_(0.3)
        m.conv1d.weight.zero_()
        m.conv1d.weight[:, 0, -1] = 1.0
        m.conv1d.bias.zero_()
    u = torch.randn(2, 13, 16, dtype=torch.float64)
    seen = []
    m.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    m(u)
    q = F.silu(m.C_proj(u)).reshape(2, 13, c.n_c_groups, c.d_state)
    k = F.silu(m.B_proj(u)).reshape(2, 13, c.n_b_groups, c.d_state).repeat_interleave(2, dim=2)
    v = F.silu(m.x_proj(u)).reshape(2, 13, c.n_x_heads, c.head_dim).repeat_interleave(2, dim=2)
    scores = torch.einsum("bthn,bshn->bhts", q, k).tril()  # causal, no softmax, no scaling
    dt = F.softplus(torch.tensor(0.3, dtype=torch.float64))
    expected = dt * torch.einsum("bhts,bshp->bthp", scores, v).reshape(2, 13, -1)
    assert _rel(seen[0], expected) < 1e-12


def test_gated_rmsnorm_orders():
    y, z = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)

    def rms(t):
        return t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()

    after = GatedRMSNorm(8).double()
    torch.testing.assert_close(after(y, z), rms(y * F.silu(z)))
    before = GatedRMSNorm(8, group_size=4, norm_before_gate=True).double()
    expected = torch.cat([rms(y[:, :4]), rms(y[:, 4:])], -1) * F.silu(z)
    torch.testing.assert_close(before(y, z), expected)


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of n_x_heads"):
        Mamba2Config(d_model=8, n_heads=4, head_dim=2, n_x_heads=3)
    with pytest.raises(ValueError, match="d_conv"):
        Mamba2Config(d_model=8, n_heads=4, head_dim=2, d_conv=1)
    with pytest.raises(ValueError, match="layout"):
        Mamba2Config(d_model=8, n_heads=4, head_dim=2, layout="interleaved")


def test_cpu_uses_the_torch_scan():
    assert scan_backend() == "torch" or torch.cuda.is_available()


def test_scan_shares_the_kernels_setting_and_log(monkeypatch, caplog):
    monkeypatch.setenv("WB_KERNELS", "bogus")
    with pytest.raises(ValueError) as ours:
        scan_backend()
    with pytest.raises(ValueError) as shared:
        kernels.backend()
    assert str(ours.value) == str(shared.value)
    x, dt, A, B, C, s0 = _inputs(1, 5, 2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="WB_KERNELS='bogus'"):
        ssd_scan(x, dt, A, B, C, 4, s0)  # CPU tensors too
    monkeypatch.setenv("WB_KERNELS", "auto")
    monkeypatch.setattr(kernels, "_announced", set())
    with caplog.at_level(logging.INFO, logger="kernels"):
        y, s = ssd_scan(x, dt, A, B, C, 4, s0)
        ssd_scan(x, dt, A, B, C, 4, s0)
    assert caplog.text.count("ssd_scan: using the torch (ref) path") == 1  # once per op and path
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 4, s0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scan_matches_the_torch_scan():
    x, dt, A, B, C, s0 = _inputs(2, 300, 4, 16, 16, torch.float32)
    x, dt, A, B, C, s0 = (t.cuda() for t in (x, dt, A, B, C, s0))
    y, s = ssd_scan(x, dt, A, B, C, 64, s0)
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 64, s0)
    assert _rel(y, y_ref) < 1e-3 and _rel(s, s_ref) < 1e-3
