import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt import kernels
from minigpt.model import Linear

needs_onednn = pytest.mark.skipif(not kernels.onednn_float32(torch.zeros(1)), reason="no oneDNN in this torch")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_forward_and_backward(bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=gen).requires_grad_()
    w = torch.randn(80, 48, generator=gen).requires_grad_()
    b = torch.randn(80, generator=gen).requires_grad_() if bias else None
    upstream = torch.randn(3, 5, 80, generator=gen)
    results = []
    for fn in (F.linear, kernels.linear):
        out = fn(x, w, b)
        out.backward(upstream)
        results.append([out.detach()] + [t.grad for t in (x, w, b) if t is not None])
        for t in (x, w, b):
            if t is not None:
                t.grad = None
    for ref, got in zip(*results, strict=True):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, w, b), results[0][0], rtol=1e-5, atol=1e-5)


@needs_onednn
def test_linear_gradients_only_where_asked():
    x, w = torch.randn(4, 8), torch.randn(6, 8, requires_grad=True)
    kernels.linear(x, w).sum().backward()
    assert x.grad is None and w.grad.shape == (6, 8)
    torch.testing.assert_close(w.grad, torch.ones(4, 6).t() @ x)


def test_mm_nt_takes_transposed_operands():
    a, b = torch.randn(30, 20), torch.randn(20, 50)
    torch.testing.assert_close(kernels.mm_nt(a, b.t()), a @ b, rtol=1e-5, atol=1e-5)  # b.t(): not contiguous
    torch.testing.assert_close(kernels.mm_nt(b.t(), a), b.t() @ a.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(30, 20\) @ \(20, 50\)\.T"):
        kernels.mm_nt(a, b)
    a16, b16 = a.bfloat16(), b.t().bfloat16()
    assert torch.equal(kernels.mm_nt(a16, b16), a16 @ b16.t())  # bfloat16: torch's own product


def test_oneDNN_only_for_float32_on_the_cpu_outside_autocast(monkeypatch):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert not kernels.onednn_float32(x.bfloat16(), w.bfloat16())
    assert not kernels.onednn_float32(x.double(), w.double())
    calls = []
    monkeypatch.setattr(kernels._Linear, "apply", lambda *args: calls.append(args) or F.linear(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.linear(x, w).dtype == torch.bfloat16  # autocast applies as to F.linear
    kernels.linear(x.bfloat16(), w.bfloat16())
    assert calls == []
    kernels.linear(x, w)
    assert len(calls) == int(kernels.onednn_float32(x, w))


def test_linear_module_is_an_nn_linear_with_the_same_state_and_draws():
    torch.manual_seed(3)
    ref = nn.Linear(16, 8)
    torch.manual_seed(3)
    ours = Linear(16, 8, fused=True)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    unfused = Linear(16, 8, fused=False)
    unfused.load_state_dict(ref.state_dict())
    assert torch.equal(unfused(x), ref(x))  # bit for bit: nn.Linear's own product


@pytest.mark.parametrize("avx512", [True, False])  # oneDNN for any layout, or only for row-major operands
def test_products_agree_whichever_kernel_takes_them(monkeypatch, avx512):
    monkeypatch.setattr(kernels, "_avx512", lambda: avx512)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 24, generator=gen), torch.randn(24, 70, generator=gen)
    torch.testing.assert_close(kernels.mm_nt(a, b.t()), a @ b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.mm_nt(b.t(), a), b.t() @ a.t(), rtol=1e-5, atol=1e-5)
    out = torch.ones(70, 40)
    assert kernels.add_mm_nt_(out, b.t(), a) is out  # in place
    torch.testing.assert_close(out, 1 + b.t() @ a.t(), rtol=1e-5, atol=1e-5)
    out16 = torch.ones(70, 40)  # bfloat16 products accumulate into float32
    kernels.add_mm_nt_(out16, b.t().bfloat16(), a.bfloat16())
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, 1 + (b.t().bfloat16() @ a.t().bfloat16()).float(), rtol=0, atol=0)


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_autocast_products_where_the_cpu_emulates_bf16(monkeypatch, emulated):
    # Multiplied in float32 where the CPU has no bfloat16 arithmetic, torch's own kernel elsewhere:
    # bfloat16 results and float32 gradients that agree with autocast's to bfloat16 rounding.
    monkeypatch.setattr(kernels, "_bf16_emulated_here", lambda: emulated)
    calls = []
    apply = kernels._Bf16Linear.apply
    monkeypatch.setattr(kernels._Bf16Linear, "apply", lambda *args: calls.append(args) or apply(*args))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 48, generator=gen).requires_grad_()
    w = (torch.randn(80, 48, generator=gen) / 7).requires_grad_()
    b = torch.randn(80, generator=gen).requires_grad_()
    q, k = torch.randn(2, 3, 10, 16, generator=gen).requires_grad_(), torch.randn(2, 3, 16, 12, generator=gen)
    upstream, upstream_qk = torch.randn(3, 5, 80, generator=gen), torch.randn(2, 3, 10, 12, generator=gen)

    def run(lin, mm):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, scores = lin(x, w, b), mm(q, k)
        assert out.dtype == scores.dtype == torch.bfloat16
        grads = torch.autograd.grad((out, scores), (x, w, b, q), (upstream.bfloat16(), upstream_qk.bfloat16()))
        assert [g.dtype for g in grads] == [torch.float32] * 4
        return [out.float(), scores.float(), *grads]

    ours, ref = run(kernels.linear, kernels.matmul), run(F.linear, torch.matmul)
    assert len(calls) == int(emulated)
    for got, expected in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, expected, rtol=2**-6, atol=2**-6 * expected.abs().max().item())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # float32 operands are cast, as by @
        assert kernels.matmul(q.float(), k).dtype == torch.bfloat16
    assert kernels.matmul(q, k).dtype == torch.float32 and not kernels.emulated_bf16_autocast(q)
