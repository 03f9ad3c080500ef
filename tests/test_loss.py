import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.backends import cpu
from minigpt.book import calc_loss_batch, calc_loss_loader
from minigpt.loss import HeadProducts, linear_cross_entropy, perplexity
from minigpt.model import GPTModel


def test_calc_loss_batch_is_mean_next_token_cross_entropy(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    x = torch.randint(0, 100, (2, 6))
    y = torch.randint(0, 100, (2, 6))
    logits = model(x)
    log_probs = torch.log_softmax(logits, dim=-1)
    manual = -log_probs.gather(-1, y.unsqueeze(-1)).mean()
    torch.testing.assert_close(calc_loss_batch(x, y, model, "cpu"), manual)


def test_calc_loss_loader_averages_the_first_batches(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    batches = [(torch.randint(0, 100, (2, 6)), torch.randint(0, 100, (2, 6))) for _ in range(4)]
    losses = [calc_loss_batch(x, y, model, "cpu").item() for x, y in batches]
    assert calc_loss_loader(batches, model, "cpu") == pytest.approx(sum(losses) / 4)
    assert calc_loss_loader(batches, model, "cpu", num_batches=2) == pytest.approx(sum(losses[:2]) / 2)
    assert calc_loss_loader(batches, model, "cpu", num_batches=10) == pytest.approx(sum(losses) / 4)
    assert math.isnan(calc_loss_loader([], model, "cpu"))


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50257)) == pytest.approx(50257)
    torch.testing.assert_close(perplexity(torch.tensor(2.0)), torch.exp(torch.tensor(2.0)))
    # a uniform model over V tokens has perplexity V
    logits = torch.zeros(1, 10)
    loss = F.cross_entropy(logits, torch.tensor([3]))
    assert perplexity(loss).item() == pytest.approx(10.0)


@pytest.mark.parametrize("products", [HeadProducts(), cpu.CpuHeadProducts()], ids=["plain", "cpu"])
@pytest.mark.parametrize("autocast, native_bf16", [(False, True), (True, True), (True, False)])
def test_linear_cross_entropy_matches_logits_then_cross_entropy(autocast, native_bf16, products, monkeypatch):
    monkeypatch.setattr(cpu, "_bf16_emulated_here", lambda: not native_bf16)
    if not native_bf16 and type(products) is HeadProducts:
        native_bf16 = True  # the plain products know nothing of the CPU: autocast's dtype, as F.linear
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(1000, 64, generator=gen)).requires_grad_()
    targets = torch.randint(0, 1000, (300,), generator=gen)
    in_bf16 = autocast and native_bf16  # a CPU that only emulates bfloat16 keeps the head in float32
    grads = []
    # Under autocast both multiply in bfloat16 (as F.linear would) and take the softmax in float32.
    for fn in (lambda: F.cross_entropy((hidden @ weight.t()).float(), targets),
               lambda: linear_cross_entropy(hidden, weight, targets, chunk_rows=64, products=products)):  # 5 chunks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=in_bf16):
            loss = fn()
        assert loss.dtype == torch.float32
        (2.5 * loss).backward()  # the upstream gradient scales both
        grads.append((loss.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # emulated: float32, as without
        got_again = linear_cross_entropy(hidden, weight, targets, chunk_rows=64, products=products)
    (ref, ref_h, ref_w), (got, got_h, got_w) = grads
    tol = {"rtol": 1e-2, "atol": 5e-4} if in_bf16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got_h, ref_h, **tol)
    torch.testing.assert_close(got_w, ref_w, **tol)
    torch.testing.assert_close(got_again.detach(), got, rtol=0, atol=0)
    float32 = F.cross_entropy(hidden @ weight.t(), targets).item()
    assert (got.item() == pytest.approx(float32, rel=1e-6)) != in_bf16  # bfloat16 really was used


def test_linear_cross_entropy_in_bfloat16_weights():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(100, 32, generator=gen).bfloat16().requires_grad_()
    weight = (0.3 * torch.randn(500, 32, generator=gen)).bfloat16().requires_grad_()
    targets = torch.randint(0, 500, (100,), generator=gen)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=30)
    loss.backward()
    ref = F.cross_entropy((hidden.float() @ weight.float().t()), targets)
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    again = linear_cross_entropy(hidden, weight, targets)
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        again.backward()
    assert abs(loss.item() - ref.item()) < 0.02


def test_head_gradient_is_a_tensor_of_its_own():
    # Not a view of the padded buffer it was summed in: autograd can then add a tied
    # embedding's gradient into it in place, and the padding rows are not kept alive.
    weight = torch.randn(1000, 16, requires_grad=True)  # 1000 pads to 1024 rows
    loss = linear_cross_entropy(torch.randn(40, 16), weight, torch.randint(0, 1000, (40,)))
    (grad,) = torch.autograd.grad(loss, weight)
    assert grad.shape == (1000, 16) and grad._base is None and grad.is_contiguous()


@pytest.mark.parametrize("tie_weights", [False, True])
def test_model_loss_with_targets_equals_calc_loss_batch(tiny_cfg, tie_weights):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg.replace(drop_rate=0.0, tie_weights=tie_weights))
    x, y = torch.randint(0, tiny_cfg.vocab_size, (2, 2, 16)).unbind(0)
    expected = calc_loss_batch(x, y, model, "cpu")
    expected.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(x, targets=y)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():  # evaluation: no gradients computed or kept
        torch.testing.assert_close(model(x, targets=y), expected.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("products", [HeadProducts(), cpu.CpuHeadProducts()], ids=["plain", "cpu"])
@pytest.mark.parametrize("n_ignored", [1, 37, 300])
def test_linear_cross_entropy_ignores_minus_100_as_cross_entropy_does(n_ignored, products):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 32, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(500, 32, generator=gen)).requires_grad_()
    targets = torch.randint(0, 500, (300,), generator=gen)
    targets[torch.randperm(300, generator=gen)[:n_ignored]] = -100  # padding, as chunk_documents writes it
    results = []
    for fn in (lambda: F.cross_entropy(hidden @ weight.t(), targets),
               lambda: linear_cross_entropy(hidden, weight, targets, chunk_rows=64, products=products)):
        loss = fn()
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    (ref, ref_h, ref_w), (got, got_h, got_w) = results
    if n_ignored == 300:  # nothing to score: NaN, as F.cross_entropy gives
        assert got.isnan() and ref.isnan()
        return
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
    assert got_h[targets == -100].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("backend", [False, True], ids=["plain", "cpu-backend"])
def test_labels_mean_what_they_mean_in_hugging_face(backend):
    from tests.hf_utils import copy_hf_into_minigpt, random_hf_gpt2

    hf = random_hf_gpt2(seed=4)
    model = copy_hf_into_minigpt(hf)
    if backend:
        cpu.optimize_for_cpu(model)
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :5] = -100  # e.g. a prompt that is not trained on
    for lab in (ids, labels):
        with torch.no_grad():
            expected = hf(input_ids=ids, labels=lab).loss
            got = model(ids, labels=lab)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # targets= stays the tutorial's pre-shifted meaning: the same loss as labels= one token over
    torch.testing.assert_close(model(ids[:, :-1], targets=ids[:, 1:]), model(ids, labels=ids), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model(ids, targets=ids, labels=ids)


@pytest.mark.parametrize("chunk_rows", [7, 64, None])
def test_linear_cross_entropy_skips_ignored_targets_anywhere(chunk_rows):
    """-100 scattered over the rows and whole chunks of it: the loss and both gradients of
    F.cross_entropy, which averages over the scored rows only."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(60, 16, generator=gen, requires_grad=True)
    weight = (0.5 * torch.randn(90, 16, generator=gen)).requires_grad_()
    targets = torch.randint(0, 90, (60,), generator=gen)
    targets[torch.rand(60, generator=gen) < 0.3] = -100
    targets[14:28] = -100
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(hidden @ weight.T, targets)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)
