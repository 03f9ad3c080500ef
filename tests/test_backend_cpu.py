import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt.backends import cpu, optimize_for_cpu
from minigpt.config import GPTConfig
from minigpt.model import GPTModel

needs_onednn = pytest.mark.skipif(not cpu.onednn_float32(torch.zeros(1)), reason="no oneDNN in this torch")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
def test_the_private_torch_apis_used_still_exist():
    # Loud on purpose: a torch upgrade that drops one of these silently loses a speed-up.
    for owner, name in ((torch.ops.mkldnn, "_linear_pointwise"), (torch.ops.mkldnn, "_reorder_linear_weight"),
                        (torch.ops.mkldnn, "_is_mkldnn_bf16_supported"), (torch.cpu, "_is_avx512_bf16_supported"),
                        (torch.cpu, "_is_amx_tile_supported")):
        assert hasattr(owner, name), f"torch {torch.__version__} has no {name}: update minigpt.backends.cpu"
    assert cpu.onednn_available() and cpu.weight_packing_available(torch.float32)
    assert isinstance(cpu.cpu_has_bf16_arithmetic(), bool)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_forward_and_backward(bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=gen).requires_grad_()
    w = torch.randn(80, 48, generator=gen).requires_grad_()
    b = torch.randn(80, generator=gen).requires_grad_() if bias else None
    upstream = torch.randn(3, 5, 80, generator=gen)
    results = []
    for fn in (F.linear, cpu.linear):
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
        torch.testing.assert_close(cpu.linear(x, w, b), results[0][0], rtol=1e-5, atol=1e-5)


@needs_onednn
def test_linear_gradients_only_where_asked():
    x, w = torch.randn(4, 8), torch.randn(6, 8, requires_grad=True)
    cpu.linear(x, w).sum().backward()
    assert x.grad is None and w.grad.shape == (6, 8)
    torch.testing.assert_close(w.grad, torch.ones(4, 6).t() @ x)


def test_mm_nt_takes_transposed_operands():
    a, b = torch.randn(30, 20), torch.randn(20, 50)
    torch.testing.assert_close(cpu.mm_nt(a, b.t()), a @ b, rtol=1e-5, atol=1e-5)  # b.t(): not contiguous
    torch.testing.assert_close(cpu.mm_nt(b.t(), a), b.t() @ a.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(30, 20\) @ \(20, 50\)\.T"):
        cpu.mm_nt(a, b)
    a16, b16 = a.bfloat16(), b.t().bfloat16()
    assert torch.equal(cpu.mm_nt(a16, b16), a16 @ b16.t())  # bfloat16: torch's own product


def test_oneDNN_only_for_float32_on_the_cpu_outside_autocast(monkeypatch):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert not cpu.onednn_float32(x.bfloat16(), w.bfloat16())
    assert not cpu.onednn_float32(x.double(), w.double())
    calls = []
    monkeypatch.setattr(cpu._Linear, "apply", lambda *args: calls.append(args) or F.linear(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu.linear(x, w).dtype == torch.bfloat16  # autocast applies as to F.linear
    cpu.linear(x.bfloat16(), w.bfloat16())
    assert calls == []
    cpu.linear(x, w)
    assert len(calls) == int(cpu.onednn_float32(x, w))


def test_cpu_linear_is_an_nn_linear_with_the_same_state_and_draws():
    torch.manual_seed(3)
    ref = nn.Linear(16, 8)
    torch.manual_seed(3)
    ours = cpu.CpuLinear(16, 8)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    plain = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    assert {type(m) for m in plain.modules() if isinstance(m, nn.Linear)} == {nn.Linear}  # bit for bit nn.Linear's


@pytest.mark.parametrize("avx512", [True, False])  # oneDNN for any layout, or only for row-major operands
def test_products_agree_whichever_kernel_takes_them(monkeypatch, avx512):
    monkeypatch.setattr(cpu, "_avx512", lambda: avx512)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 24, generator=gen), torch.randn(24, 70, generator=gen)
    torch.testing.assert_close(cpu.mm_nt(a, b.t()), a @ b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu.mm_nt(b.t(), a), b.t() @ a.t(), rtol=1e-5, atol=1e-5)
    out = torch.ones(70, 40)
    assert cpu.add_mm_nt_(out, b.t(), a) is out  # in place
    torch.testing.assert_close(out, 1 + b.t() @ a.t(), rtol=1e-5, atol=1e-5)
    out16 = torch.ones(70, 40)  # bfloat16 products accumulate into float32
    cpu.add_mm_nt_(out16, b.t().bfloat16(), a.bfloat16())
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, 1 + (b.t().bfloat16() @ a.t().bfloat16()).float(), rtol=0, atol=0)


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_autocast_products_where_the_cpu_emulates_bf16(monkeypatch, emulated):
    # Multiplied in float32 where the CPU has no bfloat16 arithmetic, torch's own kernel elsewhere:
    # bfloat16 results and float32 gradients that agree with autocast's to bfloat16 rounding.
    monkeypatch.setattr(cpu, "_bf16_emulated_here", lambda: emulated)
    calls = []
    apply = cpu._Bf16Linear.apply
    monkeypatch.setattr(cpu._Bf16Linear, "apply", lambda *args: calls.append(args) or apply(*args))
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

    ours, ref = run(cpu.linear, cpu.matmul), run(F.linear, torch.matmul)
    assert len(calls) == int(emulated)
    for got, expected in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, expected, rtol=2**-6, atol=2**-6 * expected.abs().max().item())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # float32 operands are cast, as by @
        assert cpu.matmul(q.float(), k).dtype == torch.bfloat16
    assert cpu.matmul(q, k).dtype == torch.float32 and not cpu.emulated_bf16_autocast(q)


# ------------------------------------------------------------------------------------------------
# optimize_for_cpu


def _small_cfg(**changes) -> GPTConfig:
    return GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                     qkv_bias=True, **changes)


def _loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(x, targets=y)
        logits = model(x)
    (loss + logits.float().square().mean()).backward()
    return loss.detach(), logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bf16, emulated", [(False, False), (True, False), (True, True)])  # emulated: bf16 only
@pytest.mark.parametrize("tie_weights", [False, True])
def test_optimize_for_cpu_keeps_state_dict_numbers_and_gradients(monkeypatch, bf16, emulated, tie_weights):
    monkeypatch.setattr(cpu, "_bf16_emulated_here", lambda: emulated)
    torch.manual_seed(0)
    plain = GPTModel(_small_cfg(tie_weights=tie_weights)).train()
    fast = optimize_for_cpu(copy.deepcopy(plain))
    assert type(fast) is cpu.CpuGPTModel and type(fast.trf_blocks[0].att) is cpu.CpuAttention
    assert type(fast.out_head) is cpu.CpuLinear and type(fast.trf_blocks[1].ff.layers[0]) is cpu.CpuLinear
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, fast.state_dict()[k]) for k, v in plain.state_dict().items())
    x, y = torch.randint(0, 100, (2, 2, 16), generator=torch.Generator().manual_seed(1)).unbind(0)
    ref, got = _loss_and_grads(plain, x, y, bf16), _loss_and_grads(fast, x, y, bf16)
    # float32: rounding apart; bfloat16: each side rounds its products to bfloat16 in its own order.
    rtol = 2**-4 if bf16 else 1e-4
    largest = max(g.abs().max().item() for g in ref[2].values())
    for name, expected, value in [("loss", ref[0], got[0]), ("logits", ref[1], got[1]),
                                  *((n, g, got[2][n]) for n, g in ref[2].items())]:
        # The key bias's gradient is zero but for rounding: softmax ignores what adds to a whole row.
        scale = largest if name.endswith("W_key.bias") else expected.abs().max().item()
        torch.testing.assert_close(value, expected, rtol=rtol, atol=rtol * scale, msg=name)


def test_optimize_for_cpu_is_idempotent_and_reaches_nested_models():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = GPTModel(_small_cfg())
            self.head = nn.Linear(32, 2)

    wrapper = Wrapper()
    assert optimize_for_cpu(optimize_for_cpu(wrapper)) is wrapper
    assert type(wrapper.gpt) is cpu.CpuGPTModel and type(wrapper.gpt.out_head) is cpu.CpuLinear
    assert type(wrapper.head) is nn.Linear  # outside the GPT model: left alone


def test_optimize_for_cpu_leaves_tutorial_models_and_other_devices_alone():
    tutorial = optimize_for_cpu(GPTModel(_small_cfg(arithmetic="tutorial")))
    on_meta = optimize_for_cpu(GPTModel(_small_cfg()).to("meta"))
    for model in (tutorial, on_meta):
        assert not {type(m) for m in model.modules()} & {cpu.CpuLinear, cpu.CpuAttention, cpu.CpuGPTModel}


@pytest.mark.parametrize("batch", [1, 4])  # float32: plain weights for 1 row, reordered ones for 4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_packs_weights_gives_the_plain_results_and_switches_off_after(dtype, batch):
    torch.manual_seed(0)
    model = optimize_for_cpu(GPTModel(_small_cfg(tie_weights=True)).eval()).to(dtype)
    decoding = model.decoding(batch)
    if not decoding.packed:
        pytest.skip("oneDNN weight packing is not available here")
    assert len(decoding.packed) == 6 * 2 + 1  # q, k, v, out_proj and the 2 MLP layers of 2 blocks, and the head
    shares = [w.layout == torch.strided and w.data_ptr() == m.weight.data_ptr() for m, w in decoding.packed.items()]
    assert all(shares) if dtype == torch.float32 and batch == 1 else not any(shares)
    idx = torch.randint(0, 100, (batch, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(idx)
        for _ in range(2):  # entered once per decoding step
            with decoding:
                torch.testing.assert_close(model(idx), plain, rtol=0, atol=1e-4 if dtype == torch.float32 else 0.05)
    # Nothing stays switched on: the model trains as before.
    assert all(m.packed is None for m in decoding.packed)
    model(idx).float().sum().backward()
    assert model.out_head.weight.grad is not None


def test_keep_freed_memory_reports_whether_it_applied():
    assert isinstance(cpu.keep_freed_memory(), bool)


@needs_onednn
@pytest.mark.parametrize("avx512", [True, False])
def test_one_row_decoding_uses_mkl_on_avx2_and_onednn_on_avx512(monkeypatch, avx512):
    # oneDNN's fixed cost per call outweighs its product for plain weights on an AVX2 CPU.
    monkeypatch.setattr(cpu, "_avx512", lambda: avx512)
    calls = []
    monkeypatch.setattr(cpu, "onednn_linear", lambda *args: calls.append(1) or F.linear(*args))
    model = optimize_for_cpu(GPTModel(_small_cfg(tie_weights=True)).eval())
    idx = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(idx)
        calls.clear()
        with model.decoding(1):
            torch.testing.assert_close(model(idx), plain, rtol=0, atol=1e-5)
    assert len(calls) == (6 * 2 + 1 if avx512 else 0)
