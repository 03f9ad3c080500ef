"""`--config FILE.toml` and the shipped recipes: every recipe parses to flags a run accepts, the
command line wins over a recipe, and a bad key or value is one line naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from minigpt.cli.train import build_parser, check_args, main, model_config, parse_args
from minigpt.errors import ConfigError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def test_the_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"chapter5", "discharge-summaries", "wikipedia-tiny", "bookcorpus-gpt2", "shakespeare-cpu"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_through_the_parser(recipe):
    args = parse_args(["--config", str(recipe)])
    check_args(args)
    model_config(args)
    defaults = vars(build_parser().parse_args([]))
    assert any(vars(args)[k] != defaults[k] for k in defaults if k != "config") or recipe.stem == "chapter5"


def test_the_chapter5_recipe_is_the_defaults():
    recipe = vars(parse_args(["--config", str(RECIPES[0].parent / "chapter5.toml")]))
    defaults = vars(build_parser().parse_args([]))
    differ = {k for k in defaults if k != "config" and recipe[k] != defaults[k]}
    assert differ <= {"lr_schedule", "init"}  # named as they run: constant, torch
    chapter5 = RECIPES[0].parent / "chapter5.toml"
    assert model_config(parse_args([])) == model_config(parse_args(["--config", str(chapter5)]))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_recipe_values_and_command_line_precedence(tmp_path):
    path = write(tmp_path, 'lr = 3e-4\nbatch_size = 4\nadam-betas = [0.9, 0.95]\nno-progress = true\n'
                           'qkv-bias = true\nno-tie-weights = true\neval-iters = "all"\nattention = "reference"\n'
                           'compile = false\nsample-prompt = ""\n')
    args = parse_args(["--config", str(path), "--batch-size", "8"])
    assert (args.lr, args.batch_size, args.adam_betas, args.progress) == (3e-4, 8, [0.9, 0.95], False)
    assert (args.qkv_bias, args.tie_weights, args.eval_iters, args.arithmetic) == (True, False, None, "tutorial")
    assert (args.compile, args.sample_prompt) == (False, "")
    assert parse_args(["--config", str(path), "--lr", "1e-3"]).lr == 1e-3


@pytest.mark.parametrize("text,message", [
    ("learning_rate = 1e-3\n", "unknown key 'learning_rate': not a flag of python -m minigpt.train"),
    ("lr-shedule = 'cosine'\n", "(did you mean 'lr-schedule'?)"),
    ("lr = 'fast'\n", "lr = 'fast': expected a number"),
    ("batch-size = 2.5\n", "batch-size = 2.5: expected an integer"),
    ("lr-schedule = 'step'\n", "expected one of constant, cosine, linear"),
    ("compile = 1\n", "compile = 1: expected true or false"),
    ("adam-betas = 0.9\n", "expected a list of 2 values"),
    ("eval-iters = 'most'\n", "expected a number of batches or all"),
    ("lr = \n", "not a valid TOML file"),
])
def test_a_bad_recipe_is_one_line_naming_file_and_key(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        parse_args(["--config", str(path)])
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_missing_recipe_names_the_file(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err == f"error: --config {tmp_path / 'nope.toml'}: No such file or directory\n"


def test_the_hf_preset_is_what_transformers_builds():
    """`--preset gpt2-hf` needs no other flag to be GPT2LMHeadModel(GPT2Config()): same parameters
    (tied head, Q/K/V biases) and the paper's init."""
    transformers = pytest.importorskip("transformers")
    import torch

    from minigpt import GPTModel, get_preset

    torch.manual_seed(0)
    small = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**small))
    args = parse_args(["--preset", "gpt2-hf", "--n-layers", "2", "--n-heads", "4", "--emb-dim", "64",
                       "--context-length", "128"])
    cfg = model_config(args)
    assert cfg == get_preset("gpt2-hf", n_layers=2, n_heads=4, emb_dim=64, context_length=128)
    assert (cfg.qkv_bias, cfg.tie_weights, cfg.init, cfg.drop_rate) == (True, True, "gpt2", 0.1)
    ours = GPTModel(cfg)
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert ours.tok_emb.weight.std().item() == pytest.approx(hf.transformer.wte.weight.std().item(), rel=0.05)
    assert ours.out_head.weight is ours.tok_emb.weight


def stand_in_text(n: int, seed: int) -> list[str]:
    """Short documents of varied, learnable words."""
    import random

    words = "the king sat on his throne while a dog ran past every house in the small green town".split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) + "." for _ in range(n)]


def stand_in_data(kind: str, tmp_path: Path) -> list[str]:
    """The --data (and --val-data) flags that point a recipe at a small local file of its format."""
    import json

    if kind == "csv":
        path = tmp_path / "lab2-data.csv"
        path.write_text("HADM_ID,TEXT\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(stand_in_text(80, 1))))
        return ["--data", str(path)]
    if kind == "jsonl":
        files = []
        for name, seed in (("train", 2), ("valid", 3)):
            path = tmp_path / f"wiki-{name}.jsonl"
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in stand_in_text(60, seed)))
            files.append(path)
        return ["--data", str(files[0]), "--val-data", str(files[1])]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(stand_in_text(200, 4)))
    return ["--data", str(path)]


STAND_INS = {"chapter5": "txt", "discharge-summaries": "csv", "bookcorpus-gpt2": "jsonl",
             "wikipedia-tiny": "jsonl", "shakespeare-cpu": "txt"}


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_every_recipe_runs_as_one_command_on_a_stand_in(name, tmp_path, capsys):
    """Each source document's recipe, as the README's command, with a small file of its format and
    a small model in place of the real data and GPT-2 (the jokes recipe: tests/test_lora.py)."""
    data = stand_in_data(STAND_INS[name], tmp_path)
    if name == "bookcorpus-gpt2":
        data = [*data[:2], "--val-ratio", "0.2"]  # a random share of the records: 0.15% of 60 is too few
    small = ["--n-layers", "2", "--n-heads", "2", "--emb-dim", "32", "--context-length", "32", "--max-steps", "2",
             "--batch-size", "2", "--eval-iters", "1", "--eval-interval", "1", "--report-to", "none",
             "--out-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(["--config", str(RECIPES[0].parent / f"{name}.toml"), *data, *small]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "final: train loss" in out and (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()
