"""minigpt as a model of EleutherAI's lm-evaluation-harness (`--model minigpt`).

Importing this module registers the name "minigpt" with lm-eval. The harness's own `lm_eval`
command (0.4.x) finds only the models in its source tree, so run it as
`python -m minigpt.eval lm-eval ...`, which imports this module and then hands over to it:

    python -m minigpt.eval lm-eval --model minigpt --model_args pretrained=gpt2 --tasks hellaswag

Model arguments: `checkpoint=DIR` (a minigpt checkpoint), `pretrained=NAME|DIR` (GPT-2 names,
Hugging Face or OpenAI directories) or `preset=NAME` (random weights, `seed=`), and `device=`,
`dtype=` (as the commands' --dtype), `batch_size=`, `max_gen_toks=`.
The requests are scored the way lm-eval's `hf` model scores them (same truncation, same rolling
windows, greedy generation cut at the first stop sequence), so the metrics agree on equal weights.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from tqdm.auto import tqdm

from ..device import DTYPES
from ..errors import ConfigError, require
from ..generation import SamplingConfig, generate_tokens
from ..model import GPTModel
from ..tokenizer import EOS_ID, EOS_TOKEN, get_tokenizer
from .scoring import score_tails

_api = require("lm_eval.api.model", "eval", "the lm-evaluation-harness model")
_registry = require("lm_eval.api.registry", "eval", "the lm-evaluation-harness model")
_lm_utils = require("lm_eval.utils", "eval", "the lm-evaluation-harness model")
_model_utils = require("lm_eval.models.utils", "eval", "the lm-evaluation-harness model")


def load_for_lm_eval(checkpoint: str | None = None, pretrained: str | None = None, preset: str | None = None,
                     device: str = "auto", dtype: str = "float32", seed: int | None = None) -> GPTModel:
    """The model `--model_args` names, loaded as the commands' --checkpoint/--pretrained/--preset flags do."""
    from ..cli.common import load_model_from_args

    if sum(x is not None for x in (checkpoint, pretrained, preset)) != 1:
        raise ConfigError("--model_args needs one of checkpoint=DIR, pretrained=NAME|DIR or preset=NAME")
    if str(dtype) not in DTYPES:
        raise ConfigError(f"dtype={dtype}: choose one of {', '.join(sorted(DTYPES))}")
    return load_model_from_args(argparse.Namespace(checkpoint=checkpoint, pretrained=pretrained, preset=preset,
                                                   device=device, dtype=str(dtype), seed=seed))


@_registry.register_model("minigpt")
class MinigptLM(_api.TemplateLM):
    """A `GPTModel` behind lm-eval's `loglikelihood`, `loglikelihood_rolling` and `generate_until`."""

    def __init__(self, checkpoint: str | None = None, pretrained: str | None = None, preset: str | None = None,
                 device: str | None = None, dtype: str = "float32", seed: int | None = None,
                 batch_size: int | str = 8, max_batch_size: int | None = None, max_gen_toks: int = 256,
                 model: GPTModel | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:  # a misspelt model_args key would otherwise be ignored
            raise ConfigError(f"unknown --model_args for minigpt: {', '.join(unknown)}")
        # lm-eval turns values that look like numbers into numbers: a path or name is text.
        checkpoint, pretrained, preset = (None if x is None else str(x) for x in (checkpoint, pretrained, preset))
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "auto"  # lm-eval's default is cuda:0; its hf model, too, falls back to the CPU
        self.model = model.eval() if model is not None else load_for_lm_eval(
            checkpoint, pretrained, preset, str(device), dtype, seed)
        self._device = self.model.tok_emb.weight.device
        # lm-eval passes "auto" (and max_batch_size) to ask for the largest batch that fits; a fixed
        # size is used instead.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self.tokenizer = get_tokenizer()

    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def max_length(self) -> int:
        return self.model.cfg.context_length

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, allowed_special={EOS_TOKEN})

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        """(logprob, is_greedy) of each continuation; the context is cut on the left to fit."""
        rows = [((context + continuation)[-(self.max_length + 1):], min(len(continuation), self.max_length))
                for _, context, continuation in requests]
        scores = score_tails(self.model, rows, self.batch_size, progress=not disable_tqdm, desc="loglikelihood")
        results = []
        for (key, _, _), score in zip(requests, scores, strict=True):
            result = (score.total, score.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: disjoint windows of the full context, after EOS."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in _lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *_lm_utils.make_disjoint_window(window)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Decode each context (greedy unless do_sample) until a stop sequence, EOS or max_gen_toks."""
        outputs = []
        for context, gen_kwargs in tqdm([req.args for req in requests], desc="generate_until", disable=disable_tqdm):
            kwargs = _model_utils.normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = _model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([EOS_ID]))
            max_gen_toks = min(kwargs.pop("max_gen_toks"), self.max_length - 1)
            text = self._generate(self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [EOS_ID],
                                  until, max_gen_toks, kwargs)
            text = _model_utils.postprocess_generated_text(text, until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs

    def _generate(self, ids: list[int], until: list[str], max_gen_toks: int, kwargs: dict[str, Any]) -> str:
        """New tokens on minigpt's KV cache, decoded, stopping once a stop sequence has appeared."""
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        sampling = SamplingConfig(temperature, kwargs.get("top_k"), kwargs.get("top_p"), eos_id=EOS_ID)
        new: list[int] = []
        for token in generate_tokens(self.model, [ids], max_gen_toks, sampling=sampling):
            new.append(int(token[0]))
            text = self.tok_decode(new)
            if any(stop and stop in text for stop in until):
                break
        return self.tok_decode(new)
