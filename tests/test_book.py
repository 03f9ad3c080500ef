"""minigpt.book: the tutorials' procedures, importable without the library's trainer or commands."""

import ast
import math
from pathlib import Path

import torch

from minigpt import GPTModel
from minigpt.book import evaluate_model, generate_and_print_sample

ROOT = Path(__file__).resolve().parents[1]


def test_book_imports_only_the_model_and_tokenizer():
    tree = ast.parse((ROOT / "minigpt" / "book.py").read_text(encoding="utf-8"))
    local = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert local <= {"model", "tokenizer"}, local


def test_evaluate_model_and_the_sample_leave_the_model_training(tiny_cfg, tokenizer, capsys):
    model = GPTModel(tiny_cfg.replace(vocab_size=50257)).train()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50257, (2, 8), generator=gen), torch.randint(0, 50257, (2, 8), generator=gen))]
    train_loss, val_loss = evaluate_model(model, batches, batches, "cpu", eval_iter=1)
    assert train_loss == val_loss and math.isfinite(train_loss) and model.training
    generate_and_print_sample(model, tokenizer, "cpu", "Every effort moves you")
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("Every effort moves you") and model.training
