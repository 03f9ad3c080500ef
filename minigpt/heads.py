"""Heads on GPT-2's hidden states: the base model, token classification and extractive QA.

Each reads `GPTModel.hidden_states` (the final LayerNorm's output) as Hugging Face's
`GPT2Model`, `GPT2ForTokenClassification` and `GPT2ForQuestionAnswering` read theirs, and with
the same weights gives the same numbers:

    GPTBaseModel.from_gpt(gpt)                      hidden states (batch, tokens, emb_dim), no head
    GPTForTokenClassification.from_gpt(gpt, k)      k logits at every token; labels= gives the loss
    GPTForQuestionAnswering.from_gpt(gpt)           start and end logits over the tokens; the loss
    best_spans(start_logits, end_logits)            the highest-scoring answer span of each row

`minigpt.head_tasks` has their `Task`s for `training.Trainer`. Sequence classification is
`minigpt.classifier.GPTClassifier`. The causal mask lets a token see only what precedes it:
put a question before its context, and read a whole-sequence feature at the last real token.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig, as_config
from .errors import ConfigError
from .model import GPTModel

_Head = TypeVar("_Head", bound="GPTHeadModel")


class GPTHeadModel(nn.Module):
    """GPT-2's body (embeddings, blocks, final norm) under a head of its own, `out_head` (or none).

    Composed, as `GPTClassifier` is: `self.gpt` is a `GPTModel` whose vocabulary head is replaced.
    Its parts are registered here under their own names, so parameter names and checkpoint keys
    are a GPTModel's (`out_head.*` being the new head's) and a GPTModel state_dict's body loads
    as it is; `gpt` itself stays outside the module tree, or every key would be listed twice.
    `optimize_for_cpu(model.gpt)` applies the CPU backend. `head_config()` and `build_head`
    record and rebuild the head for a checkpoint.
    """

    kind = ""  # the subclass's name in `HEADS`

    def __init__(self, cfg: GPTConfig | dict[str, Any] | str, head: nn.Module | None) -> None:
        super().__init__()
        # The head has its own weights: nothing to tie, and a checkpoint must store them.
        cfg = as_config(cfg).replace(tie_weights=False)
        gpt = GPTModel(cfg)  # its vocabulary head is built, then replaced right away
        gpt.out_head = nn.Identity() if head is None else head
        if isinstance(head, nn.Linear) and cfg.init == "gpt2":
            nn.init.normal_(head.weight, mean=0.0, std=0.02)  # Hugging Face's initializer_range
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        for name, module in gpt.named_children():
            if head is not None or name != "out_head":
                self.add_module(name, module)
        self.__dict__["gpt"] = gpt

    @property
    def cfg(self) -> GPTConfig:
        return self.gpt.cfg

    @classmethod
    def from_gpt(cls: type[_Head], gpt: GPTModel, *args: Any, **kwargs: Any) -> _Head:
        """A model with `gpt`'s embeddings, blocks and final norm (copied) and a new head;
        `args` and `kwargs` are the class's own (e.g. `num_labels`)."""
        model = cls(gpt.cfg, *args, **kwargs)
        body = {k: v for k, v in gpt.state_dict().items() if not k.startswith("out_head.")}
        missing, unexpected = model.load_state_dict(body, strict=False)
        assert not unexpected and all(k.startswith("out_head.") for k in missing), (missing, unexpected)
        return model.train(gpt.training)

    def head_config(self) -> dict[str, Any]:
        """What `build_head` needs besides the `GPTConfig` (JSON): the kind and its arguments."""
        return {"kind": self.kind}

    def train(self, mode: bool = True) -> GPTHeadModel:
        super().train(mode)
        self.gpt.training = mode  # its children follow through this module's tree
        return self

    def hidden_states(self, in_idx: torch.Tensor, left_pad: torch.Tensor | None = None) -> torch.Tensor:
        """`GPTModel.hidden_states`: the final LayerNorm's output (batch, tokens, emb_dim)."""
        return self.gpt.hidden_states(in_idx, left_pad=left_pad)

    def num_parameters(self, exclude_position: bool = False) -> int:
        """Distinct parameters of the body and the head."""
        params = {id(p): p for p in self.parameters()}
        if exclude_position:
            params.pop(id(self.pos_emb.weight))
        return sum(p.numel() for p in params.values())

    def check_token_ids(self, in_idx: torch.Tensor) -> None:
        """Raise a clear error for token ids outside the vocabulary (a host sync: once per input)."""
        self.gpt.check_token_ids(in_idx)


class GPTBaseModel(GPTHeadModel):
    """GPT-2 without a head, as Hugging Face's `GPT2Model`: token ids in, hidden states out.

    To train a head of your own, put it beside this model in a module of yours (or train this
    one alone on a loss of its hidden states: `head_tasks.HiddenStatesTask`).
    """

    kind = "base"

    def __init__(self, cfg: GPTConfig | dict[str, Any] | str) -> None:
        super().__init__(cfg, None)

    def forward(self, in_idx: torch.Tensor, left_pad: torch.Tensor | None = None) -> torch.Tensor:
        """The final LayerNorm's output (batch, tokens, emb_dim) for token ids (batch, tokens)."""
        return self.hidden_states(in_idx, left_pad)


def _check_labels(num_labels: int) -> int:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ConfigError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    return num_labels


class GPTForTokenClassification(GPTHeadModel):
    """A label for every token (tagging, NER), as Hugging Face's `GPT2ForTokenClassification`:
    dropout (at the model's `drop_rate`), then `out_head = nn.Linear(emb_dim, num_labels)` on
    every hidden state. `label_names`, if given, name the classes (`label_names[i]` is class i)."""

    kind = "token-classification"

    def __init__(self, cfg: GPTConfig | dict[str, Any] | str, num_labels: int,
                 label_names: list[str] | None = None) -> None:
        cfg = as_config(cfg)
        super().__init__(cfg, nn.Linear(cfg.emb_dim, _check_labels(num_labels)))
        if label_names is not None and len(label_names) != num_labels:
            raise ConfigError(f"{len(label_names)} label names for {num_labels} labels")
        self.num_labels = num_labels
        self.label_names = None if label_names is None else list(label_names)
        self.dropout = nn.Dropout(cfg.drop_rate)

    def head_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_labels": self.num_labels, "label_names": self.label_names}

    def forward(self, in_idx: torch.Tensor, labels: torch.Tensor | None = None,
                left_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, tokens, num_labels) for token ids (batch, tokens).

        With `labels` (batch, tokens) of class indices, return instead their mean cross-entropy
        over the tokens whose label is not -100 (padding, or sub-word pieces not scored).
        """
        logits = self.out_head(self.dropout(self.hidden_states(in_idx, left_pad)))
        if labels is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def mask_padding(logits: torch.Tensor, lengths: torch.Tensor | None = None,
                 left_pad: torch.Tensor | None = None) -> torch.Tensor:
    """`logits` (batch, tokens) with padding positions at the dtype's lowest value: those at or
    after `lengths` (right padding) and before `left_pad` (left padding), so no span starts or
    ends there."""
    if lengths is None and left_pad is None:
        return logits
    pos = torch.arange(logits.shape[1], device=logits.device)
    pad = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    if lengths is not None:
        pad |= pos >= lengths.to(logits.device)[:, None]
    if left_pad is not None:
        pad |= pos < left_pad.to(logits.device)[:, None]
    return logits.masked_fill(pad, torch.finfo(logits.dtype).min)


def span_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
              end_positions: torch.Tensor) -> torch.Tensor:
    """The mean of the start and end positions' cross-entropies, as Hugging Face computes it.

    Positions are clamped to [0, tokens] and a position >= tokens (past the input, e.g. an
    answer cut off by truncation) is not scored; a negative one clamps to 0, as there.
    """
    n = start_logits.shape[1]
    start = F.cross_entropy(start_logits, start_positions.clamp(0, n), ignore_index=n)
    end = F.cross_entropy(end_logits, end_positions.clamp(0, n), ignore_index=n)
    return (start + end) / 2


class GPTForQuestionAnswering(GPTHeadModel):
    """Extractive question answering, as Hugging Face's `GPT2ForQuestionAnswering`: the answer is
    a span of the input, and `out_head = nn.Linear(emb_dim, 2)` scores every token as its start
    and as its end. Give the question first: a token sees only the tokens before it."""

    kind = "question-answering"

    def __init__(self, cfg: GPTConfig | dict[str, Any] | str) -> None:
        cfg = as_config(cfg)
        super().__init__(cfg, nn.Linear(cfg.emb_dim, 2))

    def forward(self, in_idx: torch.Tensor, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                left_pad: torch.Tensor | None = None) -> Any:
        """(start_logits, end_logits), each (batch, tokens), for token ids (batch, tokens).

        `lengths` (batch,) of right-padded rows, or `left_pad`, keep spans off the padding
        (`mask_padding`). With `start_positions` and `end_positions` (batch,), return instead
        the loss (`span_loss`).
        """
        if (start_positions is None) != (end_positions is None):
            raise ValueError("give both start_positions and end_positions, or neither")
        logits = self.out_head(self.hidden_states(in_idx, left_pad))
        start, end = (mask_padding(t, lengths, left_pad) for t in logits.unbind(-1))
        if start_positions is None:
            return start, end
        return span_loss(start, end, start_positions, end_positions)


def best_spans(start_logits: torch.Tensor, end_logits: torch.Tensor,
               max_answer_tokens: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) token positions (batch,) of each row's best span: the highest start + end
    logit with start <= end < start + `max_answer_tokens` (end inclusive)."""
    if max_answer_tokens < 1:
        raise ConfigError(f"max_answer_tokens must be at least 1, got {max_answer_tokens}")
    n = start_logits.shape[1]
    scores = start_logits.float()[:, :, None] + end_logits.float()[:, None, :]  # (batch, start, end)
    pos = torch.arange(n, device=scores.device)
    length = pos[None, :] - pos[:, None]
    scores = scores.masked_fill((length < 0) | (length >= max_answer_tokens), -torch.inf)
    best = scores.flatten(1).argmax(-1)
    return best // n, best % n


HEADS: dict[str, type[GPTHeadModel]] = {
    cls.kind: cls for cls in (GPTBaseModel, GPTForTokenClassification, GPTForQuestionAnswering)}


def build_head(cfg: GPTConfig | dict[str, Any] | str, head_config: dict[str, Any]) -> GPTHeadModel:
    """A new head model of `cfg` from a `head_config()` (e.g. read back from a checkpoint)."""
    kind = head_config.get("kind")
    if kind not in HEADS:
        raise ConfigError(f"unknown head kind {kind!r}; the kinds are: {', '.join(HEADS)}")
    return HEADS[kind](cfg, **{k: v for k, v in head_config.items() if k != "kind"})
