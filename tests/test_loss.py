import math

import pytest
import torch
import torch.nn.functional as F

from minigpt import GPTModel, calc_loss_batch, calc_loss_loader, perplexity


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
