import pytest
import tiktoken
import torch

from minigpt import EOS_ID, text_to_token_ids, token_ids_to_text
from minigpt.errors import DownloadError
from minigpt.tokenizer import get_tokenizer


@pytest.mark.parametrize("text,ids", [
    ("Hello, I'm a language model,", [15496, 11, 314, 1101, 257, 3303, 2746, 11]),
    ("Every effort moves you", [6109, 3626, 6100, 345]),
])
def test_seed_token_ids(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
    assert text_to_token_ids(text, tokenizer).tolist() == [ids]
    assert token_ids_to_text(torch.tensor([ids]), tokenizer) == text


def test_endoftext_is_allowed_and_round_trips(tokenizer):
    ids = text_to_token_ids("a<|endoftext|>b", tokenizer)
    assert EOS_ID in ids[0].tolist()
    assert token_ids_to_text(ids, tokenizer) == "a<|endoftext|>b"


def test_local_bpe_files_give_tiktokens_gpt2(tmp_path, tokenizer):
    """encoder.json + vocab.bpe from a directory (as OpenAI ships them) build the same encoding."""
    import json

    ranks = tokenizer._mergeable_ranks
    byte_encoder = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    encoder = {to_str(tok): rank for tok, rank in ranks.items()}
    encoder["<|endoftext|>"] = EOS_ID
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    merges = []
    for tok, _rank in sorted(ranks.items(), key=lambda kv: kv[1])[256:]:
        # Each merged token splits into the two tokens of lowest rank that make it up.
        split = min(range(1, len(tok)), key=lambda i: max(ranks.get(tok[:i], 1 << 30), ranks.get(tok[i:], 1 << 30)))
        merges.append(f"{to_str(tok[:split])} {to_str(tok[split:])}")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    local = get_tokenizer(tmp_path)
    text = "Every effort moves you, naïve café 😀 <|endoftext|>  spaces\n\nend"
    assert local.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")
    assert local.n_vocab == tokenizer.n_vocab == 50257


def test_missing_bpe_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        get_tokenizer(tmp_path)


def test_offline_error_names_the_cache_variable(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DownloadError, match="TIKTOKEN_CACHE_DIR"):
        get_tokenizer()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the published scheme)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
