"""The tutorials' procedures under their own names, kept as they are so the books' code runs unchanged.

From "LLMs from scratch" (chapters 4 and 5): `generate_text_simple`, `calc_loss_batch`,
`calc_loss_loader`, `train_model_simple`, `evaluate_model`, `generate_and_print_sample`,
`softmax_with_temperature`, `print_sampled_tokens`. From the Hugging Face course's walk-through
of greedy decoding: `generate_next_greedy_token`, `generate_greedy_text`. The library's own
equivalents (`minigpt.training.Trainer`, `minigpt.generation.generate`) are faster and do more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn

from .model import GPTModel
from .tokenizer import EOS_ID, EOS_TOKEN, text_to_token_ids, token_ids_to_text

# ----------------------------------------------------------------------------------------------
# Losses (chapter 5)


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean cross-entropy of the model's predictions for one batch of (inputs, targets)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader: Iterable, model: nn.Module, device: torch.device | str,
                     num_batches: int | None = None) -> float:
    """Average `calc_loss_batch` over the first `num_batches` batches (all by default).

    An empty loader gives NaN, as in the tutorial.
    """
    n_available = len(data_loader)  # type: ignore[arg-type]
    if n_available == 0:
        return float("nan")
    num_batches = n_available if num_batches is None else min(num_batches, n_available)
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


# ----------------------------------------------------------------------------------------------
# Training (chapter 5)


def train_model_simple(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer,
                       device: torch.device | str, num_epochs: int, eval_freq: int, eval_iter: int,
                       start_context: str, tokenizer=None) -> tuple[list[float], list[float], list[int]]:
    """Train for `num_epochs`, evaluating every `eval_freq` steps; returns (train losses,
    val losses, tokens seen) at each evaluation. Prints a sample after each epoch."""
    tokenizer = tokenizer if tokenizer is not None else train_loader.dataset.tokenizer
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


def evaluate_model(model: nn.Module, train_loader, val_loader, device: torch.device | str,
                   eval_iter: int) -> tuple[float, float]:
    """Mean loss over the first `eval_iter` batches of each loader, in eval mode."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def sample_text(model: GPTModel, tokenizer, device: torch.device | str, start_context: str,
                max_new_tokens: int = 50) -> str:
    """Greedy continuation of `start_context`, on one line."""
    was_training = model.training
    model.eval()
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model, encoded, max_new_tokens, model.pos_emb.weight.shape[0])
    model.train(was_training)
    return token_ids_to_text(token_ids, tokenizer).replace("\n", " ")


def generate_and_print_sample(model: GPTModel, tokenizer, device: torch.device | str, start_context: str) -> None:
    print(sample_text(model, tokenizer, device, start_context))


# ----------------------------------------------------------------------------------------------
# Generation (chapters 4 and 5)


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


# ----------------------------------------------------------------------------------------------
# Greedy decoding, the Hugging Face course's way


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
    `minigpt.generation.generate` is the fast way to the same tokens.
    """
    generated_text = input_sentence
    for _ in range(max_length):
        _, next_token_id = generate_next_greedy_token(generated_text, tokenizer, model, device)
        generated_text += tokenizer.decode([int(next_token_id)])
    return generated_text
