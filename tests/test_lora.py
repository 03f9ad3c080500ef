"""LoRA, frozen layers and low-memory fine-tuning (issue 20)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from minigpt import (GPTModel, LoRAConfig, LoRALinear, apply_lora, checkpoint_blocks, freeze, from_pretrained,
                     get_preset, merge_lora, store_frozen_in, trainable_parameters, weights_fingerprint)
from minigpt.checkpoint import load_model, save_model
from minigpt.cli.convert import main as convert_main
from minigpt.cli.train import main as train_main
from minigpt.errors import CheckpointError, ConfigError
from minigpt.finetune import LowPrecisionLinear
from minigpt.training import configure_optimizer

from test_train import corpus, read_metrics  # noqa: F401  (the corpus fixture)


def perturb_adapters(model: torch.nn.Module) -> None:
    """Non-zero B matrices, as after some training."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)


def test_fresh_adapters_leave_the_logits_unchanged_and_merging_keeps_the_adapted_ones(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    base_logits = model(x)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all"]))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6 * tiny_cfg.n_layers
    assert torch.equal(model(x), base_logits)  # B = 0: exactly the base model at step 0

    perturb_adapters(model)
    adapted = model(x)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(GPTModel(tiny_cfg).state_dict())
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_lora_update_is_the_written_formula(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    base = model.trf_blocks[0].att.W_query
    w, b = base.weight.detach().clone(), base.bias
    apply_lora(model, LoRAConfig(rank=2, alpha=6, targets=["attn"]))
    perturb_adapters(model)
    layer = model.trf_blocks[0].att.W_query
    x = torch.randn(3, tiny_cfg.emb_dim)
    expected = F.linear(x, w, b) + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)  # alpha / rank = 3
    torch.testing.assert_close(layer(x), expected)


def test_only_adapters_and_unfrozen_layers_get_gradients_and_optimizer_state(tiny_cfg):
    model = GPTModel(tiny_cfg.replace(tie_weights=True))
    freeze(model, 0, train_head=False)
    apply_lora(model, LoRAConfig(rank=4, alpha=4, targets=["attn"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert trainable_parameters(model) == tiny_cfg.n_layers * 4 * 4 * (2 * tiny_cfg.emb_dim)
    optimizer = configure_optimizer(model, 1e-3, 0.1, torch.device("cpu"))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)

    x = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    model(x, labels=x).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert len(optimizer.state) == len(trainable)


def test_freeze_last_blocks_and_embeddings(tiny_cfg):
    model = GPTModel(tiny_cfg)
    freeze(model, 1, freeze_embeddings=True)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("trf") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"trf_blocks.1", "final_norm", "out_head"}
    with pytest.raises(ConfigError, match="--trainable-blocks must be in"):
        freeze(model, 3)


def test_frozen_weights_in_bfloat16_compute_with_their_rounded_values(tiny_cfg):
    model = GPTModel(tiny_cfg)
    freeze(model, 0, train_head=False)
    apply_lora(model, LoRAConfig(rank=2, alpha=2, targets=["attn"]))
    perturb_adapters(model)
    saved = store_frozen_in(model, torch.bfloat16)
    assert saved > 0
    linears = [m for m in model.modules() if isinstance(m, LowPrecisionLinear)]
    assert len(linears) == 6 * tiny_cfg.n_layers + 1  # + the untied head
    assert all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(m.lora_A.dtype == torch.float32 for m in model.modules() if isinstance(m, LoRALinear))

    layer = model.trf_blocks[0].ff.layers[0]
    x = torch.randn(5, tiny_cfg.emb_dim, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, layer.weight.float(), layer.bias.float()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, layer.out_features) @ layer.weight.float())

    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    model(ids, labels=ids).backward()
    assert all(p.grad is None for p in model.parameters() if p.dtype == torch.bfloat16)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_cfg):
    cfg = tiny_cfg.replace(drop_rate=0.1)
    a, b = GPTModel(cfg), GPTModel(cfg)
    b.load_state_dict(a.state_dict())
    checkpoint_blocks(b)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    grads = []
    for model in (a, b):
        torch.manual_seed(5)  # the same dropout masks: checkpointing replays the RNG state
        loss = model(x, labels=x)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for ga, gb in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# the train command


@pytest.fixture
def base_dir(tmp_path) -> Path:
    """A small pretrained-like GPT-2 (tied head, qkv biases) saved as a minigpt model."""
    torch.manual_seed(11)
    model = GPTModel(get_preset("tiny", tie_weights=True, qkv_bias=True, init="gpt2"))
    return save_model(model, tmp_path / "base")


def lora_args(data: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--init-from", str(base), "--context-length", "32", "--batch-size", "4",
            "--eval-interval", "2", "--eval-iters", "2", "--out-dir", str(out), "--no-progress", "--seed", "1",
            "--lora-rank", "4", "--lora-targets", "attn,mlp", "--lr", "1e-2", "--lora-dropout", "0.1", *extra]


def test_lora_run_saves_only_the_adapters_and_resumes_exactly(corpus, base_dir, tmp_path, capsys):  # noqa: F811
    common = ("--max-steps", "6", "--save-interval", "3", "--keep-last", "5", "--drop-rate", "0.1",
              "--grad-accum", "2", "--base-dtype", "bfloat16", "--grad-checkpointing")
    a = tmp_path / "a"
    assert train_main(lora_args(corpus, base_dir, a, *common)) == 0
    out = capsys.readouterr()
    assert "trainable parameters: 9,216 of" in out.err and "peak memory:" in out.out
    ckpt = a / "checkpoints" / "step-000006"
    saved = load_file(ckpt / "model.safetensors")
    assert saved and all(k.endswith(("lora_A", "lora_B")) for k in saved)
    assert sum(t.numel() for t in saved.values()) == 9_216  # 2 layers x 4 x ((64 + 64) x 4 + (64 + 256) x 2)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["lora"]["base"] == str(base_dir.resolve()) and config["lora"]["rank"] == 4

    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step-000003", b / "checkpoints" / "step-000003")
    assert train_main(["--resume", "latest", "--out-dir", str(b), "--no-progress"]) == 0
    final_b = load_file(b / "checkpoints" / "step-000006" / "model.safetensors")
    for name in saved:
        assert torch.equal(saved[name], final_b[name]), name
    losses_a = [m["loss"] for m in read_metrics(a / "metrics.jsonl") if m["event"] == "step"][3:]
    assert losses_a == [m["loss"] for m in read_metrics(b / "metrics.jsonl") if m["event"] == "step"]


def test_lora_checkpoint_loads_on_its_base_and_refuses_another(corpus, base_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert train_main(lora_args(corpus, base_dir, out, "--max-steps", "4", "--eval-interval", "0")) == 0
    ckpt = out / "checkpoints" / "step-000004"
    model = from_pretrained(ckpt)
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    x = torch.randint(0, 50257, (1, 10))
    adapted = model(x)
    base = from_pretrained(base_dir)
    from minigpt import crop_context
    crop_context(base, 32)
    assert not torch.allclose(adapted, base(x), atol=1e-4)  # the adapters learned something

    from minigpt.cli.eval import main as eval_main
    from minigpt.cli.generate import main as generate_main

    assert generate_main(["--checkpoint", str(ckpt), "--prompt", "the cat", "--max-new-tokens", "5"]) == 0
    assert eval_main(["perplexity", "--checkpoint", str(ckpt), "--data", str(corpus), "--no-progress"]) == 0
    with pytest.raises(CheckpointError, match="LoRA checkpoint"):
        load_model(ckpt)  # without its base
    other = GPTModel(get_preset("tiny", tie_weights=True, qkv_bias=True, context_length=32))
    with pytest.raises(CheckpointError, match="other weights than the base"):
        load_model(ckpt, base=other)
    torch.manual_seed(99)
    save_model(GPTModel(get_preset("tiny", tie_weights=True, qkv_bias=True, init="gpt2")), base_dir)
    with pytest.raises(CheckpointError, match="other weights than the base"):
        from_pretrained(ckpt)


def test_merge_lora_exports_a_plain_model(corpus, base_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert train_main(lora_args(corpus, base_dir, out, "--max-steps", "2", "--eval-interval", "0")) == 0
    ckpt = out / "checkpoints" / "step-000002"
    x = torch.randint(0, 50257, (2, 9))
    adapted = from_pretrained(ckpt)(x)
    assert convert_main(["--from", "minigpt", str(ckpt), "--to", "hf", str(tmp_path / "hf")]) == 2
    assert convert_main(["--from", "minigpt", str(ckpt), "--to", "hf", str(tmp_path / "hf"), "--merge-lora"]) == 0
    merged = from_pretrained(tmp_path / "hf")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)
    assert weights_fingerprint(merged) != weights_fingerprint(from_pretrained(base_dir))


def test_lora_needs_pretrained_weights(corpus, tmp_path, capsys):  # noqa: F811
    args = ["--data", str(corpus), "--preset", "tiny", "--context-length", "32", "--out-dir", str(tmp_path / "r"),
            "--lora-rank", "4", "--max-steps", "1", "--no-progress"]
    assert train_main(args) == 2
    assert "--lora-rank fine-tunes pretrained weights: give --init-from" in capsys.readouterr().err


def test_the_jokes_recipe_runs_on_a_small_stand_in(base_dir, tmp_path, capsys):
    """recipes/jokes-gpt2-xl.toml as one command, with a small CSV and base in place of the
    short-jokes dataset and GPT-2 XL: jokes templated, packed whole, LoRA on a bfloat16 base."""
    words = "why did the chicken cross road to get other side a cat dog walks into bar".split()
    gen = torch.Generator().manual_seed(2)
    rows = [f'{i},"{" ".join(words[j] for j in torch.randint(0, len(words), (int(n),), generator=gen))}"'
            for i, n in enumerate(torch.randint(4, 14, (150,), generator=gen), start=1)]
    data = tmp_path / "shortjokes.csv"
    data.write_text("ID,Joke\n" + "\n".join(rows) + "\n", encoding="utf-8")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "jokes-gpt2-xl.toml"
    out = tmp_path / "jokes"
    assert train_main(["--config", str(recipe), "--data", str(data), "--init-from", str(base_dir),
                       "--context-length", "64", "--grad-accum", "2", "--max-steps", "2", "--out-dir", str(out),
                       "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "trainable parameters: 16,384 of" in err  # rank 16 x (64 + 64) x 4 attention linears x 2 layers
    config = json.loads((out / "checkpoints" / "step-000002" / "config.json").read_text())
    assert config["lora"]["rank"] == 16 and config["train_args"]["template"] == "JOKE: {Joke}"
    assert config["train_args"]["chunking"] == "pack-docs" and config["train_args"]["base_dtype"] == "bfloat16"


def test_templated_packing_keeps_every_joke_whole_and_ends_each_with_eos(tmp_path, tokenizer):
    """The jokes recipe's data: "JOKE: " + joke + <|endoftext|>, packed into windows of at most
    context + 1 tokens without cutting a joke in two."""
    from minigpt import load_tokens, window_dataset
    from minigpt.data import TokenDocuments

    gen = torch.Generator().manual_seed(7)
    words = "why did the chicken cross road to get other side a cat dog walks into bar".split()
    jokes = [" ".join(words[j] for j in torch.randint(0, len(words), (int(n),), generator=gen))
             for n in torch.randint(3, 15, (40,), generator=gen)]
    path = tmp_path / "jokes.csv"
    path.write_text("ID,Joke\n" + "".join(f'{i},"{j}"\n' for i, j in enumerate(jokes)), encoding="utf-8")
    tokens = load_tokens(path, tokenizer, text_column="Joke", template="JOKE: {Joke}", progress=False)
    windows = window_dataset(TokenDocuments(tokens.ids, tokens.doc_starts), context_length=40, chunking="pack-docs")
    seen = []
    for i in range(len(windows)):
        x, y = windows[i]
        tokens = [int(x[0])] + [int(t) for t in y if t != -100]  # the window's real tokens
        text = tokenizer.decode(tokens)
        assert text.endswith("<|endoftext|>"), text  # no joke runs on into the next window
        seen += text.split("<|endoftext|>")[:-1]
    assert seen == [f"JOKE: {j}" for j in jokes]
