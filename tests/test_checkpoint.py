"""Saving and loading every model kind: language models and classifiers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from minigpt import GPTModel
from minigpt.files import sha256_file
from minigpt.weights import load_classifier
from minigpt.checkpoint import (CONFIG_FILE, FORMAT, TRAINER_FILE, WEIGHTS_FILE, CheckpointError,
                                load_model, load_trainer_state, read_config, save_model)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_language_model_round_trips(tiny_cfg, tmp_path):
    model = GPTModel(tiny_cfg)
    path = save_model(model, tmp_path / "m", metadata={"step": 3}, extra_files={TRAINER_FILE: {"step": 3}})
    assert sorted(os.listdir(path)) == sorted([CONFIG_FILE, WEIGHTS_FILE, TRAINER_FILE])
    assert json.loads((path / CONFIG_FILE).read_text())["format"] == FORMAT
    cfg, meta = read_config(path)
    files = meta.pop("files")  # each other file's size and sha256, as written
    assert cfg == tiny_cfg and meta == {"format": FORMAT, "step": 3}
    for name in (WEIGHTS_FILE, TRAINER_FILE):
        assert files[name] == {"size": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
    loaded = load_model(path, dtype=torch.float64)
    assert type(loaded) is GPTModel and not loaded.training
    assert loaded.tok_emb.weight.dtype == torch.float64
    assert same_state(load_model(path), model)
    assert load_trainer_state(path) == {"step": 3}
    assert load_model(path, drop_rate=0.5).cfg.drop_rate == 0.5


def test_a_classifier_checkpoint_loads_as_a_classifier(tiny_cfg, tmp_path):
    from minigpt.classifier import GPTClassifier

    model = GPTClassifier(tiny_cfg, ["ham", "spam"], 8)
    path = save_model(model, tmp_path / "c", metadata={"train_args": {"labels": ["ham", "spam"], "max_length": 8}})
    for loaded in (load_model(path), load_classifier(path)):
        assert isinstance(loaded, GPTClassifier) and not loaded.training
        assert loaded.labels == ["ham", "spam"] and loaded.max_length == 8
        assert same_state(loaded, model)


def test_load_classifier_refuses_a_language_model(tiny_cfg, tmp_path):
    path = save_model(GPTModel(tiny_cfg), tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a classifier checkpoint"):
        load_classifier(path)


def test_damaged_checkpoints_are_named(tiny_cfg, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")
    path = save_model(GPTModel(tiny_cfg), tmp_path / "m")
    with pytest.raises(CheckpointError, match=f"not a training checkpoint \\({TRAINER_FILE} is missing"):
        load_trainer_state(path)
    (path / WEIGHTS_FILE).write_bytes((path / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE} is missing"):
        load_model(path)
    (path / CONFIG_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="unreadable config"):
        read_config(path)


def test_a_mis_shaped_checkpoint_names_the_tensor(tiny_cfg, tmp_path):
    path = save_model(GPTModel(tiny_cfg), tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"pos_emb\.weight has shape \(16, 32\), the model expects \(32, 32\)"):
        load_model(path, context_length=32)
