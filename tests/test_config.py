import pytest

from minigpt.config import PRESETS, GPTConfig, get_preset
from minigpt.errors import ConfigError
from minigpt.model import GPTModel


def test_defaults_are_the_tutorial_124m_config():
    cfg = GPTConfig()
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (50257, 1024, 768, 12, 12)
    assert cfg.drop_rate == 0.1 and cfg.qkv_bias is False and cfg.tie_weights is False
    assert cfg.arithmetic == "fast" and cfg.init == "gpt2"


def test_from_dict_accepts_ctx_len_and_rejects_unknown_keys():
    cfg = GPTConfig.from_dict({"vocab_size": 50257, "ctx_len": 256, "emb_dim": 768, "n_heads": 12,
                               "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False})
    assert cfg.context_length == 256
    with pytest.raises(ValueError, match="unknown GPTConfig key.*'n_embd'"):
        GPTConfig.from_dict({"n_embd": 768})
    with pytest.raises(ValueError, match="ctx_len=256 and context_length=512"):
        GPTConfig.from_dict({"ctx_len": 256, "context_length": 512})
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("legacy,arithmetic", [("sdpa", "fast"), ("reference", "tutorial")])
def test_from_dict_maps_the_legacy_attention_key(legacy, arithmetic):
    # Configs saved before `arithmetic` existed name it `attention`.
    assert GPTConfig.from_dict({"attention": legacy}).arithmetic == arithmetic
    assert GPTConfig.from_dict({"attention": legacy, "arithmetic": arithmetic}).arithmetic == arithmetic
    with pytest.raises(ConfigError, match="attention must be one of"):
        GPTConfig.from_dict({"attention": "flash"})
    other = "tutorial" if arithmetic == "fast" else "fast"
    with pytest.raises(ConfigError, match="both attention"):
        GPTConfig.from_dict({"attention": legacy, "arithmetic": other})


@pytest.mark.parametrize("alias,full,dims", [
    ("gpt2", "gpt2-small (124M)", (768, 12, 12)),
    ("124M", "gpt2-small (124M)", (768, 12, 12)),
    ("gpt2-medium", "gpt2-medium (355M)", (1024, 24, 16)),
    ("774M", "gpt2-large (774M)", (1280, 36, 20)),
    ("gpt2-xl", "gpt2-xl (1558M)", (1600, 48, 25)),
])
def test_presets_and_aliases(alias, full, dims):
    cfg = get_preset(alias)
    assert cfg == PRESETS[full]
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == dims
    assert get_preset(alias, context_length=256).context_length == 256


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*tiny"):
        get_preset("gpt5")


@pytest.mark.parametrize("field,value,message", [
    ("emb_dim", 100, "emb_dim \\(100\\) must be divisible by n_heads \\(12\\)"),
    ("n_layers", 0, "n_layers must be a positive integer, got 0"),
    ("vocab_size", -5, "vocab_size must be a positive integer, got -5"),
    ("context_length", 2.5, "context_length must be a positive integer, got 2.5"),
    ("drop_rate", 1.0, "drop_rate must be in \\[0, 1\\), got 1.0"),
    ("drop_rate", -0.1, "drop_rate must be in \\[0, 1\\), got -0.1"),
    ("arithmetic", "flash", "arithmetic must be one of"),
    ("init", "xavier", "init must be one of"),
])
def test_invalid_values_name_field_and_value(field, value, message):
    with pytest.raises(ConfigError, match=message):  # a ValueError
        GPTConfig(**{field: value})
    assert issubclass(ConfigError, ValueError)


def test_model_accepts_config_dict_or_preset_name():
    d = {"vocab_size": 50, "ctx_len": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
         "qkv_bias": True}
    assert GPTModel(d).cfg.context_length == 8
    assert GPTModel("tiny").cfg == PRESETS["tiny"]
