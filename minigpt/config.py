"""Model configuration: the `GPTConfig` dataclass and the GPT-2 presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import ConfigError

ARITHMETIC_KINDS = ("fast", "tutorial")
INIT_KINDS = ("gpt2", "torch")
# The field `arithmetic` was once `attention`, with these values; old checkpoints' configs still load.
LEGACY_ATTENTION = {"sdpa": "fast", "reference": "tutorial"}


def check_arithmetic(value: str) -> str:
    """`value` if it names an arithmetic ("fast" or "tutorial"), else a `ConfigError`."""
    if value not in ARITHMETIC_KINDS:
        raise ConfigError(f"arithmetic must be one of {ARITHMETIC_KINDS}, got {value!r}")
    return value


@dataclass(frozen=True)
class GPTConfig:
    """Shape and behaviour of a `GPTModel`.

    Field names follow the tutorials (`GPT_CONFIG_124M`); the defaults are that
    dictionary: GPT-2 small with dropout 0.1, no qkv bias and an untied output head.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    # GPT-2 shares the output head with the token embedding; the tutorial's model does not.
    tie_weights: bool = False
    # "fast": one-kernel attention, LayerNorm and GELU (F.scaled_dot_product_attention,
    # F.layer_norm, F.gelu); "tutorial": the tutorial's written-out formulas (masked softmax,
    # LayerNorm, GELU), which reproduce the tutorial's numbers bit for bit.
    arithmetic: str = "fast"
    # "gpt2": the paper's init; "torch": PyTorch's default init, as the tutorial's model has.
    init: str = "gpt2"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ConfigError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        check_arithmetic(self.arithmetic)
        if self.init not in INIT_KINDS:
            raise ConfigError(f"GPTConfig.init must be one of {INIT_KINDS}, got {self.init!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a plain dict such as the tutorials' `GPT_CONFIG_124M`.

        Older keys are accepted: `ctx_len` for `context_length`, and `attention` ("sdpa" or
        "reference") for `arithmetic` ("fast" or "tutorial"); unknown keys are an error.
        """
        d = dict(d)
        if "attention" in d:
            if d["attention"] not in LEGACY_ATTENTION:
                raise ConfigError(f"attention must be one of {tuple(LEGACY_ATTENTION)}, got {d['attention']!r}")
            d["attention"] = LEGACY_ATTENTION[d["attention"]]
        for old, new in (("ctx_len", "context_length"), ("attention", "arithmetic")):
            if old in d:
                if new in d and d[new] != d[old]:
                    raise ConfigError(f"config gives both {old}={d[old]!r} and {new}={d[new]!r}")
                d[new] = d.pop(old)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> GPTConfig:
        return replace(self, **changes)


_GPT2_SIZES = {
    "gpt2-small (124M)": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium (355M)": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large (774M)": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl (1558M)": dict(emb_dim=1600, n_layers=48, n_heads=25),
}
PRESETS: dict[str, GPTConfig] = {name: GPTConfig(**dims) for name, dims in _GPT2_SIZES.items()}
# OpenAI's GPT-2 as released (and as transformers' GPT2LMHeadModel builds it): biases on Q, K, V,
# the output head tied to the token embedding, the paper's init; the tutorial's presets untie the
# head and drop those biases.
HF_SUFFIX = "-hf"
for _name, _dims in _GPT2_SIZES.items():
    _short = _name.split(" ")[0].replace("gpt2-small", "gpt2")
    PRESETS[_short + HF_SUFFIX] = GPTConfig(**_dims, qkv_bias=True, tie_weights=True, init="gpt2")
# Small enough to train in seconds on a laptop CPU; used by the tests and quick runs.
PRESETS["tiny"] = GPTConfig(context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)

PRESET_ALIASES = {
    "gpt2": "gpt2-small (124M)", "gpt2-small": "gpt2-small (124M)", "124M": "gpt2-small (124M)",
    "gpt2-medium": "gpt2-medium (355M)", "355M": "gpt2-medium (355M)",
    "gpt2-large": "gpt2-large (774M)", "774M": "gpt2-large (774M)",
    "gpt2-xl": "gpt2-xl (1558M)", "1558M": "gpt2-xl (1558M)",
}


PRESET_ALIASES.update({"gpt2-small-hf": "gpt2-hf", "124M-hf": "gpt2-hf", "355M-hf": "gpt2-medium-hf",
                       "774M-hf": "gpt2-large-hf", "1558M-hf": "gpt2-xl-hf"})


def is_openai_architecture(name: str) -> bool:
    """Whether preset `name` is one of OpenAI's GPT-2 as released (`gpt2-hf`, ..., `gpt2-xl-hf`)."""
    return PRESET_ALIASES.get(name, name).endswith(HF_SUFFIX)


def get_preset(name: str, **overrides: Any) -> GPTConfig:
    """Return a preset by full name or alias: the tutorial's `gpt2` (`124M`), `gpt2-medium`, ...,
    `tiny`, or OpenAI's released architecture `gpt2-hf`, `gpt2-medium-hf`, ..., `gpt2-xl-hf`."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        choices = sorted(set(PRESETS) | set(PRESET_ALIASES))
        raise ConfigError(f"unknown preset {name!r}; choose one of {choices}")
    return PRESETS[key].replace(**overrides)


def as_config(cfg: GPTConfig | dict[str, Any] | str) -> GPTConfig:
    """Accept a `GPTConfig`, a tutorial-style dict, or a preset name."""
    if isinstance(cfg, GPTConfig):
        return cfg
    if isinstance(cfg, dict):
        return GPTConfig.from_dict(cfg)
    if isinstance(cfg, str):
        return get_preset(cfg)
    raise TypeError(f"expected GPTConfig, dict or preset name, got {type(cfg).__name__}")
