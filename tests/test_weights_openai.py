"""OpenAI's GPT-2 TensorFlow checkpoints: the tutorial's API, from_pretrained, errors.

The checkpoints are written here in OpenAI's exact layout (tf.compat.v1 Saver, variables
`model/wte`, `model/h0/attn/c_attn/w` of shape [1, C, 3C], ...) from a tiny random
GPT2LMHeadModel, so a loaded GPTModel can be checked against transformers' logits.
Importing TensorFlow takes seconds: the TF tests share one module-scoped checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_weights_hf import ATOL, VOCAB, max_diff, random_gpt2
from transformers import GPT2LMHeadModel

from minigpt import GPTModel
from minigpt.checkpoint import CheckpointError
from minigpt.convert import main as convert_main
from minigpt.weights import assign, download_and_load_gpt2, from_pretrained, load_openai, load_weights_into_gpt

DATA = "model.ckpt.data-00000-of-00001"


def openai_variables(hf: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """`hf`'s weights under OpenAI's variable names and shapes."""
    sd = {k: v.numpy() for k, v in hf.transformer.state_dict().items()}
    variables = {"model/wte": sd["wte.weight"], "model/wpe": sd["wpe.weight"],
                 "model/ln_f/g": sd["ln_f.weight"], "model/ln_f/b": sd["ln_f.bias"]}
    for i in range(hf.config.n_layer):
        for ln in ("ln_1", "ln_2"):
            variables[f"model/h{i}/{ln}/g"] = sd[f"h.{i}.{ln}.weight"]
            variables[f"model/h{i}/{ln}/b"] = sd[f"h.{i}.{ln}.bias"]
        for conv in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            hf_conv = f"h.{i}.{conv.replace('/', '.')}"
            variables[f"model/h{i}/{conv}/w"] = sd[f"{hf_conv}.weight"][None]  # Conv1D: [1, in, out]
            variables[f"model/h{i}/{conv}/b"] = sd[f"{hf_conv}.bias"]
    return variables


def openai_hparams(hf: GPT2LMHeadModel) -> dict[str, int]:
    c = hf.config
    return {"n_vocab": c.vocab_size, "n_ctx": c.n_positions, "n_embd": c.n_embd, "n_head": c.n_head,
            "n_layer": c.n_layer}


def write_openai_checkpoint(model_dir: Path, variables: dict[str, np.ndarray], hparams: dict[str, int]) -> None:
    """The seven files of an OpenAI GPT-2 release, the checkpoint saved by a tf.compat.v1 Saver."""
    import tensorflow as tf

    model_dir.mkdir(parents=True, exist_ok=True)
    with tf.Graph().as_default():
        # Placeholders, not constants, so the values stay out of the .meta graph as in OpenAI's.
        feeds, inits = {}, []
        for name, value in variables.items():
            ph = tf.compat.v1.placeholder(tf.float32, value.shape)
            inits.append(tf.compat.v1.Variable(ph, name=name).initializer)
            feeds[ph] = value
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as sess:
            sess.run(inits, feeds)
            saver.save(sess, str(model_dir / "model.ckpt"))
    (model_dir / "hparams.json").write_text(json.dumps(hparams))
    (model_dir / "encoder.json").write_text(json.dumps({"!": 0, '"': 1}))
    (model_dir / "vocab.bpe").write_text("#version: 0.2\n")


def tutorial_params(variables: dict[str, np.ndarray], n_layer: int) -> dict:
    """The tutorial's `load_gpt2_params_from_tf_ckpt`, over an in-memory dict of variables."""
    params: dict = {"blocks": [{} for _ in range(n_layer)]}
    for name, array in variables.items():
        parts = name.split("/")[1:]
        target = params
        if parts[0].startswith("h"):
            target = params["blocks"][int(parts[0][1:])]
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = np.squeeze(array)
    return params


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    return random_gpt2(seed=7)


@pytest.fixture(scope="module")
def openai_dir(hf_model, tmp_path_factory) -> Path:
    pytest.importorskip("tensorflow")
    model_dir = tmp_path_factory.mktemp("openai") / "124M"
    write_openai_checkpoint(model_dir, openai_variables(hf_model), openai_hparams(hf_model))
    return model_dir


@pytest.fixture
def openai_copy(openai_dir, tmp_path) -> Path:
    """A copy of the checkpoint a test may break."""
    return Path(shutil.copytree(openai_dir, tmp_path / "124M"))


# --- TensorFlow checkpoints -------------------------------------------------------------------

def test_published_layout(openai_dir):
    assert sorted(p.name for p in openai_dir.iterdir()) == sorted(
        ["checkpoint", "encoder.json", "hparams.json", DATA, "model.ckpt.index", "model.ckpt.meta", "vocab.bpe"])


def test_from_pretrained_matches_transformers(openai_dir, hf_model):
    model = from_pretrained(openai_dir)
    assert max_diff(model, hf_model) < ATOL
    assert not model.training
    assert model.cfg.qkv_bias and model.cfg.tie_weights and model.cfg.drop_rate == 0.0
    assert model.cfg.context_length == hf_model.config.n_positions


def test_download_and_load_gpt2_with_files_present(openai_dir, hf_model, tmp_path):
    shutil.copytree(openai_dir, tmp_path / "124M")
    settings, params = download_and_load_gpt2(model_size="124M", models_dir=tmp_path)  # no network needed
    assert settings == openai_hparams(hf_model)
    assert set(params) == {"blocks", "b", "g", "wpe", "wte"}
    expected = tutorial_params(openai_variables(hf_model), hf_model.config.n_layer)
    assert len(params["blocks"]) == len(expected["blocks"]) == 2
    c = settings["n_embd"]
    assert params["blocks"][1]["attn"]["c_attn"]["w"].shape == (c, 3 * c)
    for key in ("wte", "g", "b"):
        np.testing.assert_array_equal(params[key], expected[key])
    np.testing.assert_array_equal(params["blocks"][1]["mlp"]["c_proj"]["w"],
                                  expected["blocks"][1]["mlp"]["c_proj"]["w"])

    # The tutorial's next step: its config (qkv biases, untied head), then load_weights_into_gpt.
    gpt = GPTModel({"vocab_size": VOCAB, "ctx_len": settings["n_ctx"], "emb_dim": c, "n_heads": 4,
                    "n_layers": 2, "drop_rate": 0.1, "qkv_bias": True}).eval()
    load_weights_into_gpt(gpt, params)
    assert max_diff(gpt, hf_model) < ATOL
    # Names map to the OpenAI sizes and use the same directory.
    assert max_diff(from_pretrained("gpt2", models_dir=tmp_path), hf_model) < ATOL


def test_assign_is_the_tutorials_shape_checked_new_parameter():
    left = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    right = np.arange(6, dtype=np.float32).reshape(2, 3)
    new = assign(left, right)
    assert isinstance(new, torch.nn.Parameter) and new.requires_grad and new.dtype == torch.float64
    np.testing.assert_array_equal(new.detach().numpy(), right)
    right[0, 0] = 100.0  # a copy: the model's parameter does not follow the numpy array
    assert new[0, 0].item() == 0.0
    with pytest.raises(ValueError, match=r"shape mismatch: left \(2, 3\), right \(3, 2\)"):
        assign(left, right.T)


def test_truncated_data_file(openai_copy):
    data = openai_copy / DATA
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{DATA}: truncated \({size - 10} bytes, the index needs {size}\)"):
        load_openai(openai_copy)


@pytest.mark.parametrize("change, message", [
    ({"n_layer": 3}, r"hparams\.json disagrees with the tensors: it gives 3 layers, the tensors hold blocks h0\.\.h1"),
    ({"n_embd": 64}, r"hparams\.json disagrees with the tensors: wte is \(100, 32\), the config implies \(100, 64\)"),
    ({"n_ctx": None}, r"hparams\.json: unreadable hparams"),
])
def test_hparams_disagreeing_with_tensors(openai_copy, change, message):
    hparams = json.loads((openai_copy / "hparams.json").read_text())
    (openai_copy / "hparams.json").write_text(json.dumps({**hparams, **change}))
    with pytest.raises(CheckpointError, match=message):
        load_openai(openai_copy)


def test_convert_openai_to_hf(openai_dir, hf_model, tmp_path):
    assert convert_main(["--from", "openai", str(openai_dir), "--to", "hf", str(tmp_path / "hf")]) == 0
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert (exported(x).logits - hf_model(x).logits).abs().max() < ATOL


# --- The tutorial's params dict, without TensorFlow ---------------------------------------------

@pytest.fixture
def params(hf_model) -> dict:
    return tutorial_params(openai_variables(hf_model), hf_model.config.n_layer)


def gpt2_shaped(hf_model, **overrides) -> GPTModel:
    c = hf_model.config
    cfg = {"vocab_size": c.vocab_size, "context_length": c.n_positions, "emb_dim": c.n_embd,
           "n_heads": c.n_head, "n_layers": c.n_layer, "drop_rate": 0.0, "qkv_bias": True}
    return GPTModel({**cfg, **overrides}).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_load_weights_into_gpt(params, hf_model, tie):
    gpt = gpt2_shaped(hf_model, tie_weights=tie)
    load_weights_into_gpt(gpt, params)
    assert max_diff(gpt, hf_model) < ATOL
    assert (gpt.out_head.weight is gpt.tok_emb.weight) is tie  # a tied model stays tied


def _set(params, path, value):
    *parents, leaf = path
    for p in parents:
        params = params[p]
    if value is None:
        del params[leaf]
    else:
        params[leaf] = value


@pytest.mark.parametrize("path, value, message", [
    (("blocks", 1, "mlp", "c_fc", "b"), None,
     r"params: missing tensors: the checkpoint has nothing for trf_blocks\.1\.ff\.layers\.0\.bias; "
     "they would be left at their random init"),
    (("wpe",), None, r"missing tensors: the checkpoint has nothing for pos_emb\.weight"),
    (("blocks", 0, "attn", "c_attn", "scale"), np.ones(3, np.float32), r"unexpected tensor 'h0/attn/c_attn/scale'"),
    (("blocks", 0, "attn", "c_proj", "w"), np.ones((32, 16), np.float32),
     r"h0/attn/c_proj/w has shape \(32, 16\), the model needs \(32, 32\) for trf_blocks\.0\.att\.out_proj\.weight"),
    (("blocks", 1, "attn", "c_attn", "b"), np.ones(90, np.float32),
     r"h1/attn/c_attn/b has shape \(90,\), the model needs \(96,\) for trf_blocks\.1\.att\.W_query\.bias, "
     r"trf_blocks\.1\.att\.W_key\.bias, trf_blocks\.1\.att\.W_value\.bias"),
])
def test_load_weights_into_gpt_errors(params, hf_model, path, value, message):
    _set(params, path, value)
    with pytest.raises(CheckpointError, match=message):
        load_weights_into_gpt(gpt2_shaped(hf_model), params)


def test_model_without_qkv_bias_is_told_to_add_it(params, hf_model):
    with pytest.raises(CheckpointError, match=r"no trf_blocks\.0\.att\.W_query\.bias .*use qkv_bias=True"):
        load_weights_into_gpt(gpt2_shaped(hf_model, qkv_bias=False), params)


def test_missing_tensorflow_names_the_extra(tmp_path, monkeypatch, capsys):
    for name in ("hparams.json", "model.ckpt.index", DATA):
        (tmp_path / name).write_text("{}")
    (tmp_path / "hparams.json").write_text(json.dumps({"n_vocab": 10, "n_ctx": 8, "n_embd": 8, "n_head": 2,
                                                       "n_layer": 1}))
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    with pytest.raises(ImportError, match=r"pip install 'minigpt\[openai\]'"):
        load_openai(tmp_path)
    assert convert_main(["--from", "openai", str(tmp_path), "--to", "minigpt", str(tmp_path / "out")]) == 2
    assert re.match(r"error: .*pip install 'minigpt\[openai\]'", capsys.readouterr().err)


def test_not_a_checkpoint_and_unknown_size(tmp_path):
    with pytest.raises(CheckpointError, match=r"not an OpenAI GPT-2 checkpoint directory \(missing hparams\.json"):
        load_openai(tmp_path)
    with pytest.raises(ValueError, match="unknown GPT-2 model size '125M'"):
        download_and_load_gpt2("125M", tmp_path)


def test_assign_is_exported_at_the_top():
    import minigpt

    assert minigpt.assign is assign
