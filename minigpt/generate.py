"""Text generation from a GPTModel: sampling, KV cache, batches, streaming, and a CLI.

`generate` keeps the tutorial's signature and meaning (temperature 0 is greedy, the
context is cropped to the last `context_size` tokens) and adds nucleus sampling, a
private random generator, per-row EOS, prompts of different lengths and a KV cache.

    python -m minigpt.generate --pretrained gpt2 --prompt "Every effort moves you" \\
        --max-new-tokens 50 --temperature 0.8 --top-k 50 --seed 1
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import tiktoken
import torch
from torch import nn

from .device import DTYPES, resolve_device
from .kernels import onednn_linear
from .model import GPTModel, KVCache
from .tokenizer import EOS_ID, EOS_TOKEN

Prompts = torch.Tensor | Sequence[Sequence[int] | torch.Tensor]


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
                         context_size: int) -> torch.Tensor:
    """Greedy decoding, as in the tutorial: recompute the (cropped) context each step."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)[:, -1, :]
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def generate_next_greedy_token(input_sentence: str, tokenizer: tiktoken.Encoding, model: GPTModel,
                               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely token to follow `input_sentence`, and its probability: `(prob, token_id)`,
    two 0-d tensors. The Hugging Face course's walk-through of greedy decoding, with minigpt's
    model and tokenizer. The text is encoded whole (an empty one as `<|endoftext|>`), cropped to
    the model's context, and sent to `device` (default: the model's).
    """
    ids = tokenizer.encode(input_sentence, allowed_special={EOS_TOKEN}) or [EOS_ID]
    device = model.tok_emb.weight.device if device is None else device
    idx = torch.tensor([ids[-model.cfg.context_length:]], device=device)
    with torch.no_grad():
        logits = model(idx)[0, -1]
    next_token_prob, next_token_id = torch.max(torch.softmax(logits.float(), dim=-1), dim=-1)
    return next_token_prob, next_token_id


def generate_greedy_text(input_sentence: str, tokenizer: tiktoken.Encoding, model: GPTModel,
                         device: torch.device | str | None = None, max_length: int = 20) -> str:
    """`input_sentence` followed by `max_length` greedy tokens, as in the Hugging Face course: the
    text grows by each token's decoded string and is encoded afresh at every step, so the model
    sees the text's own tokenization (and a character split over two tokens becomes U+FFFD).
    `generate` is the fast way to the same tokens.
    """
    generated_text = input_sentence
    for _ in range(max_length):
        _, next_token_id = generate_next_greedy_token(generated_text, tokenizer, model, device)
        generated_text += tokenizer.decode([int(next_token_id)])
    return generated_text


# ---------------------------------------------------------------------------------------
# Sampling


def softmax_with_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The tutorial's probabilities at a temperature: softmax of `logits / temperature` over the
    last dimension. Below 1 sharpens the distribution, above 1 flattens it."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return torch.softmax(logits / temperature, dim=-1)


def print_sampled_tokens(probas: torch.Tensor, inverse_vocab: Mapping[int, str] | None = None,
                         num_samples: int = 1_000, seed: int = 123) -> torch.Tensor:
    """The tutorial's demonstration of sampling: draw `num_samples` token ids from the 1-D
    distribution `probas`, one at a time from a generator seeded with `seed`, and print how often
    each id came up as `"{count} x {word}"` (`inverse_vocab` maps ids to words; ids are printed
    without it). As in the tutorial, the lines stop at the largest id drawn. Returns the counts.
    """
    generator = torch.Generator(device=probas.device).manual_seed(seed)
    sample = [torch.multinomial(probas, num_samples=1, generator=generator).item() for _ in range(num_samples)]
    counts = torch.bincount(torch.tensor(sample))
    for i, freq in enumerate(counts.tolist()):
        print(f"{freq} x {inverse_vocab[i] if inverse_vocab is not None else i}")
    return counts


def check_generation_args(max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                          top_p: float | None = None, vocab_size: int | None = None) -> None:
    """Raise ValueError, naming the argument, for settings `generate` cannot honour."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0.0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= (vocab_size or top_k)):
        limit = f" and <= the vocabulary size {vocab_size}" if vocab_size else ""
        raise ValueError(f"top_k must be >= 1{limit}, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Apply, in this order, top-k, temperature and top-p to (batch, vocab) logits.

    Removed tokens get -inf. Ties are kept rather than broken by token id, so the result
    never depends on how a sort orders equal values:
    - top-k keeps every logit >= the k-th largest (more than k tokens if some tie with it);
    - top-p (nucleus) ranks the temperature-scaled probabilities, keeps the shortest
      prefix whose sum reaches `top_p`, and also every token as likely as the last one kept.
    Top-k does not depend on the temperature; top-p does, so it comes after it.
    """
    if top_k is not None:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, -torch.inf)
    logits = logits / temperature
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(logits, dim=-1)
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        # The nucleus is the first n tokens, n = 1 + (how many partial sums stay below top_p).
        n_keep = (sorted_probs.cumsum(dim=-1) < top_p).sum(dim=-1, keepdim=True) + 1
        threshold = sorted_probs.gather(-1, n_keep.clamp(max=probs.shape[-1]) - 1)
        logits = logits.masked_fill(probs < threshold, -torch.inf)
    return logits


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of (batch, vocab) logits: (batch, 1) token ids.

    Temperature 0 is greedy (`top_k`/`top_p` then change nothing); among equal maxima
    the lowest token id wins. Otherwise sample from `filter_logits`, with `generator`
    or, without one, torch's global RNG (as the tutorial does).
    """
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ---------------------------------------------------------------------------------------
# Decoding


def _as_padded_batch(idx: Prompts, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (batch, width) and the left padding of each row (None if there is none).

    A tensor is taken as is; a list of prompts of different lengths is right-aligned
    ("left padding"), the padding slots holding token 0, which the model masks out.
    """
    if isinstance(idx, torch.Tensor):
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, tokens), got {tuple(idx.shape)}")
        if idx.shape[1] == 0:
            raise ValueError(f"got an empty prompt: start from {EOS_TOKEN} (id {EOS_ID}), as GPT-2 does")
        return idx.to(device), None
    prompts = [torch.as_tensor(p, dtype=torch.long).flatten().tolist() for p in idx]
    if not prompts:
        raise ValueError("got no prompts")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: start it from {EOS_TOKEN} (id {EOS_ID}), "
                             "as GPT-2 does")
    width = max(map(len, prompts))
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    rows = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    return rows, (pad if pad.any() else None)


def generate_tokens(model: GPTModel, idx: Prompts, max_new_tokens: int, context_size: int | None = None,
                    temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
                    top_p: float | None = None, generator: torch.Generator | int | None = None,
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, a (batch,) tensor, as each step produces it.

    Takes the arguments of `generate` (and checks them now, not at the first step).
    A row that has produced `eos_id` keeps getting `eos_id`; the iteration ends after
    `max_new_tokens` steps, or as soon as every row has produced `eos_id` (that last
    step is not yielded).
    """
    tokens, left_pad = _as_padded_batch(idx, model.tok_emb.weight.device)
    context_size = model.cfg.context_length if context_size is None else context_size
    if not 1 <= context_size <= model.cfg.context_length:
        raise ValueError(f"context_size must be in [1, {model.cfg.context_length}] "
                         f"(the model's context_length), got {context_size}")
    check_generation_args(max_new_tokens, temperature, top_k, top_p, model.cfg.vocab_size)
    model.check_input(tokens[:, -context_size:])
    if tokens.shape[1] > context_size:
        warnings.warn(f"prompt of {tokens.shape[1]} tokens is longer than the context "
                      f"({context_size}); only its last {context_size} tokens are used", stacklevel=2)
    if isinstance(generator, int):
        generator = torch.Generator(tokens.device).manual_seed(generator)
    return _decode(model, tokens, left_pad, max_new_tokens, context_size, temperature, top_k, top_p,
                   eos_id, generator, use_cache)


PackedLinears = dict[nn.Linear, torch.Tensor]


def pack_linears(model: nn.Module, batch_size: int) -> PackedLinears:
    """oneDNN versions of a CPU model's Linear weights, for fast inference.

    Decoding multiplies a few rows by every weight matrix at each step. oneDNN does that
    faster than torch's default CPU kernel: 1.7x for one float32 row on a 2-core AVX-512
    EPYC (where MKL takes a slower path), 1.5x for 4-16 rows with weights reordered into
    oneDNN's blocked layout, 1.3-1.7x for bfloat16. The reordered copies cost one more
    model's worth of memory; for one to three float32 rows the plain weights are as fast,
    so they are used as they are. Nothing is packed (an empty dict: the plain path) off the
    CPU, where oneDNN is missing, or when the weights exceed a quarter of the machine's memory.
    """
    weight = next(model.parameters())
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if (weight.device.type != "cpu" or not torch.backends.mkldnn.is_available()
            or not hasattr(mkldnn, "_reorder_linear_weight")
            or (weight.dtype == torch.bfloat16 and not mkldnn._is_mkldnn_bf16_supported())
            or weight.dtype not in (torch.float32, torch.bfloat16)):
        return {}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    reorder = weight.dtype == torch.bfloat16 or batch_size >= 4
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if reorder and nbytes > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4:
        return {}
    return {m: mkldnn._reorder_linear_weight(m.weight.detach(), batch_size) if reorder else m.weight.detach()
            for m in linears}


@contextmanager
def _packed(packed: PackedLinears) -> Iterator[None]:
    """Route each packed Linear through oneDNN for the duration (no autograd: inference only)."""
    def packed_forward(m: nn.Linear, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: onednn_linear(x, w, m.bias)

    for m, w in packed.items():
        m.forward = packed_forward(m, w)  # an instance attribute shadows nn.Linear.forward
    try:
        yield
    finally:
        for m in packed:
            del m.forward


def _decode(model: GPTModel, prompt: torch.Tensor, left_pad: torch.Tensor | None, max_new_tokens: int,
            context_size: int, temperature: float, top_k: int | None, top_p: float | None,
            eos_id: int | None, generator: torch.Generator | None, use_cache: bool) -> Iterator[torch.Tensor]:
    batch, length = prompt.shape
    # One preallocated buffer for prompt and output (no torch.cat per step).
    tokens = torch.cat([prompt, prompt.new_empty(batch, max_new_tokens)], dim=1)
    cache = None
    if use_cache and max_new_tokens > 0:
        cache = KVCache(model.cfg, batch, min(context_size, length + max_new_tokens - 1),
                        device=tokens.device, dtype=model.tok_emb.weight.dtype)
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    window_start, window_pad = -1, None
    # Packed per call, switched on per step: between steps (while the caller has the
    # token) the model is the plain one, trainable as ever.
    packed = pack_linears(model, batch) if max_new_tokens > 0 else {}
    for _ in range(max_new_tokens):
        start = max(0, length - context_size)  # the model sees tokens[:, start:length]
        with torch.no_grad(), _packed(packed):
            if cache is not None and start == window_start:
                # The cache holds this window but its newest token: feed just that one.
                logits = model(tokens[:, length - 1:length], cache, window_pad, last_only=True)
            else:
                # Run the whole window: the first step, every step without a cache, and
                # every step once the window slides. GPT-2's positions are absolute, so
                # sliding changes every cached key; re-running the window is what gives
                # the tutorial's cropped-context tokens.
                window_start = start
                window_pad = None if left_pad is None else (left_pad - start).clamp(min=0)
                if window_pad is not None and not window_pad.any():
                    window_pad = None  # no padding left in the window: plain causal attention
                if cache is not None:
                    cache.reset()
                logits = model(tokens[:, start:length], cache, window_pad, last_only=True)
        next_token = sample_next_token(logits[:, -1].float(), temperature, top_k, top_p,
                                       generator).squeeze(1)
        if eos_id is not None:
            next_token = next_token.masked_fill(done, eos_id)
            done |= next_token == eos_id
            if done.all():
                return
        tokens[:, length] = next_token
        length += 1
        yield next_token


def generate(model: GPTModel, idx: Prompts, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             top_p: float | None = None, generator: torch.Generator | int | None = None,
             use_cache: bool = True) -> torch.Tensor | list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens.

    `idx` is a (batch, tokens) tensor, as in the tutorial, or a list of prompts (token-id
    lists or 1-D tensors) of any lengths, each continued exactly as if alone.
    `context_size` (default: the model's) crops what the model sees to the last tokens.
    `temperature`, `top_k`, `top_p`: see `sample_next_token` and `filter_logits`.
    `generator`: a `torch.Generator` on the model's device, or an int seed, so sampling
    is reproducible without touching the global RNG.
    `eos_id`: a row stops at this token. A tensor result keeps one width: rows that
    stopped are filled with `eos_id` from their EOS on; once every row has stopped,
    generation ends without appending that last all-EOS step, so at batch size 1 the
    EOS is not in the output (as in the tutorial). A list result holds, per prompt, the
    prompt and its new tokens up to (not including) the first EOS.
    `use_cache`: reuse keys/values across steps (same tokens, far fewer FLOPs).
    Run the model in eval mode; the result is on the model's device.
    """
    steps = list(generate_tokens(model, idx, max_new_tokens, context_size, temperature, top_k,
                                 eos_id, top_p, generator, use_cache))
    new = torch.stack(steps, dim=1) if steps else None
    if isinstance(idx, torch.Tensor):
        idx = idx.to(model.tok_emb.weight.device)
        return idx if new is None else torch.cat([idx, new], dim=1)
    out = []
    for i, prompt in enumerate(idx):
        row = [] if new is None else new[i].tolist()
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        out.append(torch.as_tensor(prompt).flatten().tolist() + row)
    return out


def decode_pieces(token_ids: Iterable[int], tokenizer: tiktoken.Encoding) -> Iterator[tuple[int, str]]:
    """Turn a stream of token ids into `(token_id, text)` pairs as the ids arrive.

    `text` is what the token completes. A GPT-2 token may hold part of a character
    (UTF-8 uses up to 4 bytes), so a character split over tokens arrives with its last
    token and the earlier ones carry only what they complete, often "". Joined, the
    pieces equal `tokenizer.decode` of the ids (incomplete bytes at the very end become
    U+FFFD, as there). A token that ends mid-character is held back until the next one
    arrives, so that the end of the stream can still give it that U+FFFD.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    held: tuple[int, str] | None = None
    for token_id in token_ids:
        if held is not None:
            yield held
        piece = (token_id, decoder.decode(tokenizer.decode_single_token_bytes(token_id)))
        held = piece if decoder.getstate()[0] else None  # bytes of a character still pending?
        if held is None:
            yield piece
    if held is not None:
        yield held[0], held[1] + decoder.decode(b"", final=True)


def stream(model: GPTModel, tokenizer: tiktoken.Encoding, prompt: str | Sequence[int],
           max_new_tokens: int, context_size: int | None = None, **kwargs: Any) -> Iterator[tuple[int, str]]:
    """Generate from one prompt (text or token ids), yielding `(token_id, text)` per new token.

    See `decode_pieces` for `text`; `kwargs` are `generate`'s (temperature, top_k,
    top_p, eos_id, generator, use_cache).
    """
    ids = tokenizer.encode(prompt, allowed_special={EOS_TOKEN}) if isinstance(prompt, str) else prompt
    tokens = generate_tokens(model, [list(ids)], max_new_tokens, context_size, **kwargs)
    return decode_pieces((int(t) for t in tokens), tokenizer)


# ---------------------------------------------------------------------------------------
# Command line

def _positive_int(s: str) -> int:
    value = int(s)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt.generate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a minigpt model or training checkpoint directory")
    src.add_argument("--pretrained", help="GPT-2 weights: gpt2, gpt2-medium, ... or a directory")
    src.add_argument("--preset", help="a randomly initialised model of this preset (for testing)")
    p.add_argument("--prompt", default="", help="text to continue; '-' reads stdin; empty starts "
                   f"from {EOS_TOKEN}")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=_positive_int, default=1)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (and --preset's weights)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")
    return p


def load_for_generation(args: argparse.Namespace, device: torch.device) -> GPTModel:
    """The model named by --checkpoint, --pretrained or --preset, in eval mode."""
    dtype = DTYPES[args.dtype]
    if args.checkpoint:
        from .checkpoint import load_model
        return load_model(args.checkpoint, device=device, dtype=dtype)
    if args.pretrained:
        try:
            from .weights import from_pretrained
        except ImportError as e:
            raise ValueError(f"--pretrained needs minigpt.weights, which could not be imported ({e})") from e
        return from_pretrained(args.pretrained, device=device, dtype=dtype).eval()
    from .config import get_preset
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return GPTModel(get_preset(args.preset)).to(device=device, dtype=dtype).eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_generation_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        parser.error(str(e))
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    from .tokenizer import get_tokenizer
    try:
        device = resolve_device(args.device)
        model = load_for_generation(args, device)
        tokenizer = get_tokenizer()
        ids = tokenizer.encode(prompt, allowed_special={EOS_TOKEN}) or [EOS_ID]
        check_generation_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              model.cfg.vocab_size)
        model.check_input(torch.tensor([ids[-model.cfg.context_length:]]))
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(ids) > model.cfg.context_length:
        print(f"warning: the prompt has {len(ids)} tokens, more than the model's context of "
              f"{model.cfg.context_length}; using its last {model.cfg.context_length}", file=sys.stderr)
        ids = ids[-model.cfg.context_length:]

    eos_id = EOS_ID if EOS_ID < model.cfg.vocab_size else None
    generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)
    n_tokens, t0 = 0, time.perf_counter()
    try:
        for i in range(args.num_samples):
            if i:
                print("\n" + "-" * 40, flush=True)
            sys.stdout.write(tokenizer.decode(ids) if prompt else "")
            for _, text in stream(model, tokenizer, ids, args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, eos_id=eos_id, generator=generator,
                                  use_cache=not args.no_cache):
                n_tokens += 1
                sys.stdout.write(text)
                sys.stdout.flush()
            print(flush=True)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    print(f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:.1f} tokens/s "
          f"({device}, {args.dtype}, {'no cache' if args.no_cache else 'KV cache'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
