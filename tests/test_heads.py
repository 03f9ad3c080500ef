import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import TensorDataset
from transformers import GPT2ForQuestionAnswering, GPT2ForTokenClassification

from minigpt import GPTModel, optimize_for_cpu
from minigpt.checkpoint import load_state_into, read_config, save_model
from minigpt.errors import ConfigError
from minigpt.head_tasks import HiddenStatesTask, QuestionAnsweringTask, TokenClassificationTask
from minigpt.heads import (GPTBaseModel, GPTForQuestionAnswering, GPTForTokenClassification, best_spans,
                           build_head, mask_padding, span_loss)
from minigpt.model import KVCache
from minigpt.training import TrainConfig, Trainer
from tests.hf_utils import copy_hf_into_minigpt, random_hf_gpt2

ATOL = 1e-4  # float32 rounding on random GPT-2 weights of unit scale, as tests/test_weights_hf.py


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_lm():
    return random_hf_gpt2(n_layer=2, n_head=4, n_embd=32, vocab=100, n_positions=16, seed=0)


def hf_with_head(hf_lm, cls, **config):
    """An HF head model with `hf_lm`'s body and a random head."""
    hc = copy.deepcopy(hf_lm.config)
    for key, value in config.items():
        setattr(hc, key, value)
    model = cls(hc).eval()
    model.transformer.load_state_dict(hf_lm.transformer.state_dict())
    head = model.classifier if hasattr(model, "classifier") else model.qa_outputs
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape))
    return model, head


# ------------------------------------------------------------------------------------------------
# GPTModel.hidden_states


@pytest.mark.parametrize("arithmetic", ["fast", "tutorial"])
def test_hidden_states_are_what_the_output_head_reads(tiny_cfg, arithmetic):
    model = GPTModel(tiny_cfg.replace(arithmetic=arithmetic)).eval()
    idx = torch.randint(0, 100, (3, 9))
    hidden = model.hidden_states(idx)
    assert hidden.shape == (3, 9, tiny_cfg.emb_dim)
    assert torch.equal(model.out_head(hidden), model(idx))
    left_pad = torch.tensor([0, 2, 5])
    assert torch.equal(model.out_head(model.hidden_states(idx, left_pad=left_pad)), model(idx, left_pad=left_pad))
    last = model.hidden_states(idx, last_only=True)
    assert last.shape == (3, 1, tiny_cfg.emb_dim) and torch.equal(last, hidden[:, -1:])
    cache = KVCache(tiny_cfg, batch_size=3)
    parts = [model.hidden_states(idx[:, :4], cache), model.hidden_states(idx[:, 4:], cache)]
    torch.testing.assert_close(torch.cat(parts, 1), hidden, rtol=0, atol=1e-5)
    assert cache.length == 9
    with pytest.raises(ValueError, match="longer than context_length"):
        model.hidden_states(torch.zeros(1, 17, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# the models: hand computations and Hugging Face


def test_base_model_is_gpt_without_its_head_and_matches_hf_gpt2model(hf_lm):
    gpt = copy_hf_into_minigpt(hf_lm)
    base = GPTBaseModel.from_gpt(gpt)
    assert not base.training and not hasattr(base, "out_head")
    assert set(base.state_dict()) == {k for k in gpt.state_dict() if not k.startswith("out_head.")}
    assert base.num_parameters() == gpt.num_parameters(exclude_output_head=True)
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        hidden = base(x)
        torch.testing.assert_close(hidden, gpt.hidden_states(x), rtol=0, atol=0)
        assert (hidden - hf_lm.transformer(x).last_hidden_state).abs().max().item() < ATOL


def test_token_classification_is_a_linear_of_the_hidden_states(tiny_cfg):
    model = GPTForTokenClassification(tiny_cfg, num_labels=5).eval()
    assert model.out_head.weight.shape == (5, tiny_cfg.emb_dim) and torch.all(model.out_head.bias == 0)
    x = torch.randint(0, 100, (2, 7))
    logits = model(x)
    expected = model.hidden_states(x) @ model.out_head.weight.T + model.out_head.bias
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    labels = torch.randint(0, 5, (2, 7))
    labels[1, 4:] = -100  # padding
    scored = labels != -100
    hand = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][scored].mean()
    torch.testing.assert_close(model(x, labels=labels), hand, rtol=1e-6, atol=1e-6)


def test_token_classification_matches_hf(hf_lm):
    hf, head = hf_with_head(hf_lm, GPT2ForTokenClassification, num_labels=5)
    ours = GPTForTokenClassification.from_gpt(copy_hf_into_minigpt(hf_lm), 5)
    ours.out_head.load_state_dict(head.state_dict())
    x = torch.randint(0, 100, (3, 16))
    labels = torch.randint(0, 5, (3, 16))
    labels[0, 10:] = -100
    with torch.no_grad():
        theirs = hf(x, labels=labels)
        assert (ours(x) - theirs.logits).abs().max().item() < ATOL
        assert abs(ours(x, labels=labels).item() - theirs.loss.item()) < ATOL


def test_question_answering_hand_computation_and_hf(hf_lm):
    hf, head = hf_with_head(hf_lm, GPT2ForQuestionAnswering)
    ours = GPTForQuestionAnswering.from_gpt(copy_hf_into_minigpt(hf_lm))
    ours.out_head.load_state_dict(head.state_dict())
    x = torch.randint(0, 100, (3, 16))
    start, end = torch.tensor([2, 5, 30]), torch.tensor([4, 5, 40])  # row 2's answer lies past the input
    with torch.no_grad():
        s, e = ours(x)
        linear = ours.hidden_states(x) @ ours.out_head.weight.T + ours.out_head.bias
        torch.testing.assert_close(torch.stack([s, e], -1), linear, rtol=0, atol=1e-6)
        hand = (F.cross_entropy(s[:2], start[:2]) + F.cross_entropy(e[:2], end[:2])) / 2
        torch.testing.assert_close(ours(x, start_positions=start, end_positions=end), hand, rtol=1e-6, atol=1e-6)
        theirs = hf(x, start_positions=start, end_positions=end)
        assert (s - theirs.start_logits).abs().max().item() < ATOL
        assert (e - theirs.end_logits).abs().max().item() < ATOL
        assert abs(ours(x, start_positions=start, end_positions=end).item() - theirs.loss.item()) < ATOL
    with pytest.raises(ValueError, match="both start_positions and end_positions"):
        ours(x, start_positions=start)


def test_spans_stay_off_the_padding_and_best_spans_respects_order_and_length():
    logits = torch.zeros(2, 5)
    masked = mask_padding(logits, lengths=torch.tensor([5, 3]), left_pad=torch.tensor([1, 0]))
    low = torch.finfo(torch.float32).min
    assert masked.tolist() == [[low, 0, 0, 0, 0], [0, 0, 0, low, low]]
    start = torch.tensor([[0.0, 5.0, 0.0, 0.0, 9.0], [3.0, 0.0, -5.0, -5.0, -5.0]])
    end = torch.tensor([[4.0, 0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 1.0, 0.0, 8.0]])
    # row 0: an end before the start (4 -> 0) is never chosen; row 1: 0 -> 4 is too long for 3 tokens
    starts, ends = best_spans(start, end)
    assert starts.tolist() == [4, 0] and ends.tolist() == [4, 4]
    starts, ends = best_spans(start, end, max_answer_tokens=3)
    assert starts.tolist() == [4, 0] and ends.tolist() == [4, 2]
    assert span_loss(start, end, torch.tensor([9, 9]), torch.tensor([9, 9])).isnan()  # nothing scored


def test_heads_keep_gptmodel_keys_validate_and_take_the_cpu_backend(tiny_cfg):
    gpt = GPTModel(tiny_cfg.replace(tie_weights=True)).eval()
    model = GPTForTokenClassification.from_gpt(gpt, 3, label_names=["O", "B", "I"])
    assert not model.cfg.tie_weights and model.label_names == ["O", "B", "I"]
    assert set(model.state_dict()) == set(gpt.state_dict()) | {"out_head.bias"}
    x = torch.randint(0, 100, (2, 8))
    expected = model(x)
    optimize_for_cpu(model.gpt)
    assert type(model.gpt).__name__ == "CpuGPTModel"
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    for bad in (1, 2.0, True):
        with pytest.raises(ConfigError, match="num_labels must be an integer >= 2"):
            GPTForTokenClassification(tiny_cfg, bad)
    with pytest.raises(ConfigError, match="2 label names for 3 labels"):
        GPTForTokenClassification(tiny_cfg, 3, label_names=["a", "b"])


def outputs(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return torch.stack(out) if isinstance(out, tuple) else out  # QA's (start, end)


@pytest.mark.parametrize("make", [GPTBaseModel, GPTForQuestionAnswering,
                                  lambda cfg: GPTForTokenClassification(cfg, 4, label_names=list("abcd"))])
def test_a_saved_head_is_rebuilt_from_its_config(tiny_cfg, tmp_path, make):
    model = make(tiny_cfg).eval()
    save_model(model, tmp_path / "m", metadata={"head": model.head_config()})
    cfg, meta = read_config(tmp_path / "m")
    fresh = build_head(cfg, meta["head"]).eval()
    assert type(fresh) is type(model) and fresh.head_config() == model.head_config()
    load_state_into(fresh, load_file(tmp_path / "m" / "model.safetensors"), "m")
    x = torch.randint(0, 100, (2, 8))
    assert torch.equal(outputs(fresh, x), outputs(model, x))
    with pytest.raises(ConfigError, match="unknown head kind 'ner'; the kinds are: base, token-classification"):
        build_head(cfg, {"kind": "ner"})


# ------------------------------------------------------------------------------------------------
# training each head through the shared trainer


def fit(model, task, train_set, val_set, out_dir, steps: int = 30, lr: float = 3e-3) -> dict:
    """`steps` optimizer steps of batch 8 through `Trainer`, recording the head in the run's args."""
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=lr, eval_interval=10, eval_iters=2, progress=False,
                      device="cpu", seed=1)
    out_dir.mkdir()
    trainer = Trainer(model, cfg, train_set, val_set, task, out_dir, {"head": model.head_config()})
    result = trainer.fit()
    result["history"] = trainer.state.history
    return result


def padded_rows(n: int, gen: torch.Generator, low: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 100, (n, 16), generator=gen)
    lengths = torch.randint(low, 17, (n,), generator=gen)
    ids[torch.arange(16) >= lengths[:, None]] = 0
    return ids, lengths


def tagging_set(n: int, seed: int) -> TensorDataset:
    """Each token's label is its id mod 3; padding is not scored."""
    ids, lengths = padded_rows(n, torch.Generator().manual_seed(seed))
    labels = (ids % 3).masked_fill(torch.arange(16) >= lengths[:, None], -100)
    return TensorDataset(ids, labels)


def test_token_classification_trains_through_the_trainer(tiny_cfg, tmp_path):
    model = GPTForTokenClassification(tiny_cfg, num_labels=3)
    result = fit(model, TokenClassificationTask(), tagging_set(256, 0), tagging_set(64, 1), tmp_path / "run")
    history = result["history"]
    assert history["val_loss"][-1] < 0.5 * history["val_loss"][0]
    assert history["val_accuracy"][0] < 0.6 and history["val_accuracy"][-1] > 0.9
    assert result["plot"].name == "accuracy-loss-plot.png"
    # The checkpoint holds the head: the model it describes loads it and gives the same logits.
    cfg, meta = read_config(result["checkpoint"])
    fresh = build_head(cfg, meta["train_args"]["head"]).eval()
    load_state_into(fresh, load_file(result["checkpoint"] / "model.safetensors"), "checkpoint")
    x = tagging_set(4, 2).tensors[0]
    torch.testing.assert_close(fresh(x), model.eval()(x), rtol=0, atol=0)


def span_set(n: int, seed: int) -> TensorDataset:
    """The answer runs from the token 1 to the token 2 in each row (right-padded with 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids, lengths = padded_rows(n, gen, low=6)
    start = (torch.rand(n, generator=gen) * (lengths - 2)).long()
    end = start + 1 + (torch.rand(n, generator=gen) * (lengths - start - 1)).long()
    rows = torch.arange(n)
    ids[rows, start], ids[rows, end] = 1, 2
    return TensorDataset(ids, lengths, start, end)


def test_question_answering_trains_through_the_trainer(tiny_cfg, tmp_path):
    model, task = GPTForQuestionAnswering(tiny_cfg), QuestionAnsweringTask(max_answer_tokens=16)
    val_set = span_set(64, 1)
    with torch.no_grad():
        untrained = task.evaluate(model.eval(), [val_set.tensors], torch.device("cpu"))
    result = fit(model.train(), task, span_set(256, 0), val_set, tmp_path / "run")
    history = result["history"]
    assert history["val_loss"][-1] < 0.5 * untrained["loss"] and history["val_loss"][-1] < history["val_loss"][0]
    assert untrained["exact_match"] < 0.2 and history["val_exact_match"][-1] > 0.9
    assert result["plot"].name == "loss-plot.png"


def test_base_model_trains_on_a_loss_of_its_hidden_states(tiny_cfg, tmp_path):
    target = torch.randn(tiny_cfg.emb_dim)
    data = TensorDataset(torch.randint(0, 100, (128, 16)), target.expand(128, -1))

    def pooled_mse(hidden: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.mse_loss(hidden.mean(1), batch[1])

    result = fit(GPTBaseModel(tiny_cfg), HiddenStatesTask(pooled_mse), data, data, tmp_path / "run", steps=20)
    history = result["history"]
    assert history["val_loss"][-1] < 0.5 * history["val_loss"][0]


def test_head_checkpoints_load_back_as_their_head(tiny_cfg, tmp_path):
    from minigpt.checkpoint import load_model, save_model

    x = torch.randint(0, tiny_cfg.vocab_size, (2, 7))
    for model in (GPTForTokenClassification(tiny_cfg, num_labels=3), GPTForQuestionAnswering(tiny_cfg)):
        model.eval()
        loaded = load_model(save_model(model, tmp_path / type(model).__name__))
        assert type(loaded) is type(model)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)  # a tensor, or (start, end)
