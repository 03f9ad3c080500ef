"""The token cache: `load_tokens` (document offsets, separators, templates) and its sharded,
parallel, resumable writing."""

import json
from pathlib import Path

import numpy as np
import pytest

from minigpt import token_cache
from minigpt.errors import DataError
from minigpt.token_cache import TokenCorpus, load_token_ids, load_tokens
from minigpt.tokenizer import EOS_ID

JOKES = [{"text": "Why did the chicken cross the road?", "id": 1},
         {"text": "To get to the other side.", "id": 2},
         {"text": "Knock knock.\nWho's there?", "id": 3}]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def expected(tokenizer, texts: list[str], separator: str = "eos") -> tuple[list[int], list[int]]:
    """The ids and document offsets `load_tokens` must give for these documents."""
    ids, starts = [], []
    for text in texts:
        starts.append(len(ids))
        ids += tokenizer.encode(text, allowed_special="all")
        if separator == "eos" and len(texts) > 1:
            ids.append(EOS_ID)
    return ids, starts


def test_a_text_file_is_one_document_of_exactly_its_encoding(tokenizer, tmp_path):
    text = "Every effort moves you.\nThe quick brown fox.\n" * 30
    corpus = load_tokens(write(tmp_path / "a.txt", text), tokenizer, progress=False)
    assert isinstance(corpus, TokenCorpus)
    assert corpus.ids.tolist() == tokenizer.encode(text) and corpus.ids.dtype == np.uint16
    assert corpus.doc_starts.tolist() == [0] and corpus.doc_starts.dtype == np.int64
    with pytest.raises(ValueError):
        corpus.ids[0] = 1  # read-only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "a.txt.tokens.bin", "a.txt.tokens.json"]


@pytest.mark.parametrize("separator", ["eos", "none"])
def test_documents_and_their_offsets_with_each_separator(tokenizer, tmp_path, separator):
    path = jsonl(tmp_path / "jokes.jsonl", JOKES + [{"text": ""}])  # an empty record is no document
    corpus = load_tokens(path, tokenizer, separator=separator, progress=False)
    ids, starts = expected(tokenizer, [j["text"] for j in JOKES], separator)
    assert corpus.ids.tolist() == ids and corpus.doc_starts.tolist() == starts
    header = json.loads((tmp_path / "jokes.jsonl.tokens.json").read_text())
    assert (header["separator"], header["n_docs"], header["count"]) == (separator, 3, len(ids))
    assert np.fromfile(tmp_path / "jokes.jsonl.tokens.docs", dtype="<i8").tolist() == starts


def test_a_directory_has_a_document_per_file(tokenizer, tmp_path):
    write(tmp_path / "books" / "b.txt", "second book")
    write(tmp_path / "books" / "a.txt", "first book")
    corpus = load_tokens(tmp_path / "books", tokenizer, progress=False)
    ids, starts = expected(tokenizer, ["first book", "second book"])
    assert corpus.ids.tolist() == ids and corpus.doc_starts.tolist() == starts


def test_a_template_formats_each_record_by_field_name(tokenizer, tmp_path):
    path = jsonl(tmp_path / "jokes.jsonl", JOKES)
    corpus = load_tokens(path, tokenizer, template="JOKE {id}: {text}", progress=False)
    ids, starts = expected(tokenizer, [f"JOKE {j['id']}: {j['text']}" for j in JOKES])
    assert corpus.ids.tolist() == ids and corpus.doc_starts.tolist() == starts
    csv = write(tmp_path / "notes.csv", "HADM_ID,TEXT\n7,chest pain\n8,\"fever,\ncough\"\n")
    corpus = load_tokens(csv, tokenizer, template="[{HADM_ID}] {TEXT}", separator="none", progress=False)
    assert corpus.ids.tolist() == expected(tokenizer, ["[7] chest pain", "[8] fever,\ncough"], "none")[0]
    text = "Line one\nline two.\n" * 50
    txt = write(tmp_path / "story.txt", text)
    for template in ("JOKE: {text}<|endoftext|>", "{text}\n---\n{text}", "{text!r}"):
        ids = load_token_ids(txt, tokenizer, template=template, progress=False).tolist()
        assert ids == tokenizer.encode(template.format(text=text), allowed_special="all")


def test_a_text_file_read_in_pieces_takes_a_template_at_its_ends(tokenizer, tmp_path, monkeypatch):
    from minigpt import documents

    monkeypatch.setattr(documents, "_PIECE_CHARS", 30)
    monkeypatch.setattr(token_cache, "_BATCH_CHARS", 100)
    text = "Some words here.\n  indented\nend\n" * 40
    txt = write(tmp_path / "story.txt", text)
    ids = load_token_ids(txt, tokenizer, template="<<{text}>>", progress=False).tolist()
    assert ids == tokenizer.encode(f"<<{text}>>")


@pytest.mark.parametrize("name,content,template,message", [
    ("jokes.jsonl", '{"text": "a", "id": 1}\n{"text": "b"}\n', "{id}: {text}",
     r"jokes\.jsonl: line 2 has no field 'id' \(used by the template '\{id\}: \{text\}'\); its fields are: text"),
    ("notes.csv", "ID,TEXT\n1,a\n2\n", "{ID} {TEXT}", r"notes\.csv: line 3 has no field 'TEXT'"),
    ("story.txt", "hello", "{title}: {text}", r"story\.txt: a text file has one field, \{text\}; .* uses \{title\}"),
    ("story.txt", "hello", "{text", r"the template '\{text' is not a valid format string"),
    ("story.txt", "hello", "{} {text}", r"positional field \{\}"),
])
def test_a_template_field_that_is_missing_names_file_line_and_field(tokenizer, tmp_path, name, content, template,
                                                                     message):
    with pytest.raises(DataError, match=message):
        load_tokens(write(tmp_path / name, content), tokenizer, template=template, progress=False)
    assert not list(tmp_path.glob("*.tokens.*"))


def test_template_and_separator_are_cache_settings(tokenizer, tmp_path, monkeypatch):
    path = jsonl(tmp_path / "jokes.jsonl", JOKES)
    calls = []
    real = token_cache._write_ids
    monkeypatch.setattr(token_cache, "_write_ids", lambda *a: calls.append(1) or real(*a))
    runs = [{}, {}, {"separator": "none"}, {"separator": "none"}, {"template": "Q: {text}"}, {}]
    results = [load_tokens(path, tokenizer, progress=False, **kw).ids.tolist() for kw in runs]
    assert len(calls) == 4  # each change rebuilds, a repeat reuses
    assert results[0] == results[1] == results[5] and results[2] == results[3] != results[0]
    with pytest.raises(DataError, match="unknown document separator 'newline'; use one of eos, none"):
        load_tokens(path, tokenizer, separator="newline")


def test_damaged_document_offsets_are_rebuilt(tokenizer, tmp_path, capsys):
    path = jsonl(tmp_path / "jokes.jsonl", JOKES)
    first = load_tokens(path, tokenizer, progress=False).doc_starts.tolist()
    docs = tmp_path / "jokes.jsonl.tokens.docs"
    tampered = np.fromfile(docs, dtype="<i8")
    tampered[1] += 1
    tampered.tofile(tmp_path / "x")
    (tmp_path / "x").replace(docs)
    assert load_tokens(path, tokenizer, progress=False).doc_starts.tolist() == first
    assert "jokes.jsonl.tokens.docs: the token cache is damaged" in capsys.readouterr().err


# --- shards, workers and resuming ----------------------------------------------------------------

def mixed_text(n: int, seed: int = 0) -> str:
    """Text whose whitespace, CRLFs, non-ASCII and literal end-of-text markers try every cut point."""
    rng = np.random.default_rng(seed)
    atoms = np.array(["word", " Word", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "\r", "'s", "42", ".", "é", "\u00a0",
                      "日本", "<|endoftext|>", "x\n"])
    return "".join(rng.choice(atoms, size=n))


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 3 kB encoded 500 characters at a time: many shards and pieces from small files."""
    monkeypatch.setattr(token_cache, "_SHARD_BYTES", 3000)
    monkeypatch.setattr(token_cache, "_BATCH_CHARS", 500)


@pytest.mark.parametrize("workers", [1, 2])
def test_sharded_text_is_bit_identical_to_one_encode(tokenizer, tmp_path, small_shards, workers):
    text = mixed_text(20_000)
    path = write(tmp_path / "big.txt", "\ufeff" + text)
    corpus = load_tokens(path, tokenizer, workers=workers, progress=False)
    assert corpus.ids.tolist() == tokenizer.encode(path.read_text(encoding="utf-8-sig"), allowed_special="all")
    assert corpus.doc_starts.tolist() == [0]
    assert not (tmp_path / "big.txt.tokens.parts").exists()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("separator", ["eos", "none"])
def test_sharded_records_are_bit_identical_to_encoding_each(tokenizer, tmp_path, small_shards, workers, separator):
    rng = np.random.default_rng(1)
    texts = [mixed_text(int(rng.integers(0, 30)), seed=i) for i in range(1500)]
    texts[7] = "a literal <|endoftext|> inside"  # that batch is encoded a record at a time
    path = jsonl(tmp_path / "sentences.jsonl", [{"text": t} for t in texts])
    corpus = load_tokens(path, tokenizer, separator=separator, workers=workers, progress=False)
    ids, starts = expected(tokenizer, [t for t in texts if t], separator)
    assert corpus.ids.tolist() == ids and corpus.doc_starts.tolist() == starts


def test_a_directory_of_every_kind_in_shards_matches_one_process(tokenizer, tmp_path, monkeypatch):
    books = tmp_path / "books"
    write(books / "b" / "two.txt", mixed_text(3000, 2))
    write(books / "a.txt", mixed_text(3000, 3))
    jsonl(books / "c.jsonl", [{"text": mixed_text(20, i)} for i in range(200)])
    write(books / "d.csv", "text\n" + "".join(f'"{mixed_text(10, i)}"\n'.replace("\r", "") for i in range(50)))
    reference = load_tokens(books, tokenizer, cache_dir=tmp_path / "one", progress=False)
    monkeypatch.setattr(token_cache, "_SHARD_BYTES", 2000)
    monkeypatch.setattr(token_cache, "_BATCH_CHARS", 300)
    sharded = load_tokens(books, tokenizer, cache_dir=tmp_path / "many", workers=2, progress=False)
    assert sharded.ids.tolist() == reference.ids.tolist()
    assert sharded.doc_starts.tolist() == reference.doc_starts.tolist()
    assert len(reference.doc_starts) == 2 + 200 + 50 - sum(1 for i in range(200) if not mixed_text(20, i))


def test_an_interrupted_build_keeps_its_shards_and_a_rerun_continues(tokenizer, tmp_path, small_shards, monkeypatch):
    from minigpt import token_shards

    path = write(tmp_path / "big.txt", mixed_text(20_000))
    real, done = token_shards.run_task, []

    def interrupted(task, *args):
        if task.index == 3:
            raise KeyboardInterrupt
        done.append(task.index)
        return real(task, *args)

    monkeypatch.setattr(token_shards, "run_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_tokens(path, tokenizer, workers=1, progress=False)
    parts = tmp_path / "big.txt.tokens.parts"
    assert sorted(p.name for p in parts.glob("*.json")) == ["000000.json", "000001.json", "000002.json", "plan.json"]
    assert not (tmp_path / "big.txt.tokens.json").exists()
    done.clear()
    monkeypatch.setattr(token_shards, "run_task", lambda task, *a: done.append(task.index) or real(task, *a))
    corpus = load_tokens(path, tokenizer, workers=1, progress=False)
    assert done[0] == 3 and len(done) > 3  # shards 0-2 were kept
    assert corpus.ids.tolist() == tokenizer.encode(path.read_text(encoding="utf-8"), allowed_special="all")
    assert not parts.exists()


def test_a_damaged_finished_shard_is_named_and_removed(tokenizer, tmp_path, small_shards, monkeypatch):
    from minigpt import token_shards

    path = write(tmp_path / "big.txt", mixed_text(20_000))
    real = token_shards.run_task

    def damage_first(task, settings, parts, *args):
        marker = real(task, settings, parts, *args)
        if task.index == 0:
            (parts / "000000.bin").write_bytes(b"\0\0" * marker["count"])
        return marker

    monkeypatch.setattr(token_shards, "run_task", damage_first)
    with pytest.raises(DataError, match=r"000000\.bin: a finished shard of the token cache is damaged"):
        load_tokens(path, tokenizer, workers=1, progress=False)
    monkeypatch.setattr(token_shards, "run_task", real)
    assert load_tokens(path, tokenizer, progress=False).ids.tolist() == tokenizer.encode(
        path.read_text(encoding="utf-8"), allowed_special="all")


def test_a_changed_source_discards_the_shards_of_an_interrupted_build(tokenizer, tmp_path, small_shards, monkeypatch):
    from minigpt import token_shards

    path = write(tmp_path / "big.txt", mixed_text(20_000))
    real = token_shards.run_task

    def interrupted(task, *args):
        if task.index == 2:
            raise KeyboardInterrupt
        return real(task, *args)

    monkeypatch.setattr(token_shards, "run_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_tokens(path, tokenizer, workers=1, progress=False)
    monkeypatch.setattr(token_shards, "run_task", real)
    text = "A new first line.\n" + mixed_text(20_000)
    write(path, text)
    assert load_tokens(path, tokenizer, progress=False).ids.tolist() == tokenizer.encode(
        path.read_text(encoding="utf-8"), allowed_special="all")


def test_a_bad_record_in_a_later_shard_names_its_line(tokenizer, tmp_path, small_shards):
    lines = [json.dumps({"text": f"sentence number {i}."}) for i in range(2000)]
    lines[1500] = '{"text": 15}'
    path = write(tmp_path / "s.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"s\.jsonl: line 1501: field 'text' is int, not a string"):
        load_tokens(path, tokenizer, workers=2, progress=False)
    assert not list(tmp_path.glob("s.jsonl.tokens*"))
    bad = write(tmp_path / "bad.txt", ("fine text here\n" * 1000).encode() + b"caf\xe9\n")
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8 at byte 15003 \(line 1001"):
        load_tokens(bad, tokenizer, progress=False)
