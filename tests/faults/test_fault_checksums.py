"""Flipped bytes in any checkpoint file or in a token cache are caught, not trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from faultkit import assert_recovers, resume

from minigpt.checkpoint import CheckpointError, load_model, load_trainer_state
from minigpt.cli.train import main
from minigpt.token_cache import load_token_ids


def flip(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name,where", [("model.safetensors", -5), ("model.safetensors", 0.5),
                                        ("trainer.pt", 0.5), ("trainer.pt", -40)])
def test_a_flipped_byte_in_a_checkpoint_file_is_named(run_copy, capsys, name, where):
    ckpt = run_copy / "checkpoints" / "step-000004"
    size = (ckpt / name).stat().st_size
    flip(ckpt / name, int(size * where) if isinstance(where, float) else size + where)
    loader = load_model if name == "model.safetensors" else load_trainer_state
    with pytest.raises(CheckpointError, match=f"{name}: corrupt or truncated \\(its sha256 differs"):
        loader(ckpt)
    capsys.readouterr()
    assert resume(run_copy, 5) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ckpt / name}: corrupt or truncated" in err
    # The checkpoint before it is whole: resume from there.
    assert main(["--resume", str(run_copy / "checkpoints" / "step-000002"), "--out-dir", str(run_copy),
                 "--max-steps", "4", "--no-progress"]) == 0
    assert_recovers(run_copy, 5, newest=4)


def test_a_flipped_byte_in_config_json_is_caught_by_its_parse_or_its_values(run_copy, capsys):
    """config.json holds the checksums; a damaged one is unreadable JSON or names what is wrong."""
    config_file = run_copy / "checkpoints" / "step-000004" / "config.json"
    config_file.write_text(config_file.read_text().replace("{", "[", 1))
    capsys.readouterr()
    assert resume(run_copy, 5) == 2
    assert "config.json: unreadable config" in capsys.readouterr().err


def test_a_truncated_checkpoint_file_is_named(run_copy):
    weights = run_copy / "checkpoints" / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated .* bytes, .* when saved"):
        load_model(weights.parent)


def test_a_damaged_token_cache_is_rebuilt(corpus, tokenizer, tmp_path, capsys):
    source = tmp_path / "story.txt"
    source.write_text(corpus.read_text())
    expected = load_token_ids(source, tokenizer).tolist()
    bin_path = tmp_path / "story.txt.tokens.bin"
    ids = np.fromfile(bin_path, dtype=np.uint16)
    ids[10] = (ids[10] + 1) % 50000  # another id, same size
    tampered = tmp_path / "tampered.bin"
    ids.tofile(tampered)
    tampered.replace(bin_path)  # a new file: the old one may still be mapped
    capsys.readouterr()
    assert load_token_ids(source, tokenizer).tolist() == expected
    assert capsys.readouterr().err == (f"{bin_path}: the token cache is damaged (its CRC-32 is not the one "
                                       "recorded); rebuilding it\n")
    assert load_token_ids(source, tokenizer).tolist() == expected and capsys.readouterr().err == ""


def test_a_consistently_truncated_token_cache_is_rebuilt(corpus, tokenizer, tmp_path, capsys):
    source = tmp_path / "story.txt"
    source.write_text(corpus.read_text())
    expected = load_token_ids(source, tokenizer).tolist()
    bin_path, json_path = tmp_path / "story.txt.tokens.bin", tmp_path / "story.txt.tokens.json"
    cut = tmp_path / "cut.bin"
    cut.write_bytes(bin_path.read_bytes()[:200])
    cut.replace(bin_path)
    header = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**header, "count": 100}))
    capsys.readouterr()
    assert load_token_ids(source, tokenizer).tolist() == expected
    assert "rebuilding it" in capsys.readouterr().err
