import hashlib
import json
import os
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from minigpt import data, documents, token_cache
from minigpt.data import (
    DataError,
    GPTDatasetV1,
    TokenWindowDataset,
    chunk_documents,
    create_dataloader_v1,
    iter_documents,
    load_token_ids,
    pack_documents,
    resolve_corpus,
    split_documents,
    split_tokens,
)
from minigpt.tokenizer import EOS_ID

STORY = "Every effort moves you.\nThe quick brown fox jumps over the lazy dog.\n" * 20


def shared_corpus(name: str) -> Path:
    """A named corpus from $MINIGPT_DATA_DIR (the CI provides it), without downloading."""
    directory = os.environ.get("MINIGPT_DATA_DIR")
    path = Path(directory or ".") / data.NAMED_CORPORA[name].filename
    if not directory or not path.is_file():
        pytest.skip(f"needs MINIGPT_DATA_DIR holding {path.name}")
    return path


class TutorialDataset(Dataset):
    """The chapter-2 dataset as the tutorial writes it: lists of tensors, tokenize with encode()."""

    def __init__(self, txt, tokenizer, max_length, stride):
        token_ids = tokenizer.encode(txt)
        self.input_ids, self.target_ids = [], []
        for i in range(0, len(token_ids) - max_length, stride):
            self.input_ids.append(torch.tensor(token_ids[i:i + max_length]))
            self.target_ids.append(torch.tensor(token_ids[i + 1:i + max_length + 1]))

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# --- the tutorial's dataset and loader ---------------------------------------------------------

@pytest.mark.parametrize("max_length,stride", [(4, 1), (8, 8), (16, 5)])
def test_gpt_dataset_v1_has_the_tutorials_windows(tokenizer, max_length, stride):
    ours, ref = GPTDatasetV1(STORY, tokenizer, max_length, stride), TutorialDataset(STORY, tokenizer,
                                                                                   max_length, stride)
    n = len(tokenizer.encode(STORY))
    assert len(ours) == len(ref) == len(range(0, n - max_length, stride))
    assert ours.tokenizer is tokenizer
    for i in range(len(ref)):
        (x, y), (rx, ry) = ours[i], ref[i]
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_create_dataloader_v1_gives_the_tutorials_batches_in_its_order(tokenizer):
    """Shuffling draws from the global RNG exactly as the tutorial's DataLoader does."""
    torch.manual_seed(123)
    ours = [b for b in create_dataloader_v1(STORY, batch_size=2, max_length=8, stride=8)]
    after_ours = torch.rand(1)
    torch.manual_seed(123)
    ref = [b for b in DataLoader(TutorialDataset(STORY, tokenizer, 8, 8), batch_size=2, shuffle=True,
                                 drop_last=True)]
    assert torch.equal(after_ours, torch.rand(1))
    assert len(ours) == len(ref) == len(range(0, len(tokenizer.encode(STORY)) - 8, 8)) // 2
    for (x, y), (rx, ry) in zip(ours, ref, strict=True):
        assert x.shape == (2, 8) and torch.equal(x, rx) and torch.equal(y, ry)


def test_gpt_dataset_v1_allows_endoftext(tokenizer):
    ds = GPTDatasetV1("a<|endoftext|>b c d", tokenizer, 2, 1)
    assert EOS_ID in torch.cat([ds[i][0] for i in range(len(ds))]).tolist()


def test_the_verdict_gives_the_tutorials_5145_tokens_and_batches(tokenizer, tmp_path):
    path = shared_corpus("the-verdict")
    assert resolve_corpus("the-verdict") == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.NAMED_CORPORA["the-verdict"].sha256
    ids = load_token_ids("the-verdict", tokenizer, cache_dir=tmp_path)
    text = path.read_text(encoding="utf-8")
    assert len(ids) == 5145 and ids.dtype == np.uint16
    assert ids.tolist() == tokenizer.encode(text)
    # The tutorial's chapter-5 loaders: 9 training batches of 2 x 256, 1 validation batch.
    split = int(0.9 * len(text))
    train = create_dataloader_v1(text[:split], batch_size=2, max_length=256, stride=256)
    val = create_dataloader_v1(text[split:], batch_size=2, max_length=256, stride=256, shuffle=False,
                               drop_last=False)
    assert (len(train), len(val)) == (9, 1)


# --- memmap windows, packing and chunking ------------------------------------------------------

def test_token_window_dataset_matches_gpt_dataset_v1_on_a_memmap(tokenizer, tmp_path):
    ids = np.array(tokenizer.encode(STORY), dtype=np.uint16)
    ids.tofile(tmp_path / "ids.bin")
    mm = np.memmap(tmp_path / "ids.bin", dtype=np.uint16, mode="r")
    for max_length, stride in [(8, 8), (5, 3), (len(ids) - 1, 1)]:
        ours, ref = TokenWindowDataset(mm, max_length, stride), GPTDatasetV1(STORY, tokenizer, max_length, stride)
        assert len(ours) == len(ref) > 0
        for i in (0, len(ref) // 2, len(ref) - 1, -1):
            assert all(torch.equal(a, b) for a, b in zip(ours[i], ref[i], strict=True))
        assert ours[0][0].dtype == torch.int64
    assert len(TokenWindowDataset(mm, len(ids), 1)) == 0  # one token short of a window
    with pytest.raises(IndexError):
        TokenWindowDataset(mm, 8, 8)[10**6]
    with pytest.raises(ValueError, match="positive"):
        TokenWindowDataset(mm, 8, 0)


def test_pack_documents_joins_with_eos_and_drops_the_remainder():
    docs = [[1, 2, 3], [], [4, 5, 6, 7], [8, 9]]
    ds = pack_documents(docs, context_length=4, eos_id=0)
    stream = [1, 2, 3, 0, 4, 5, 6, 7, 0, 8, 9, 0]  # empty documents vanish
    assert ds.ids.tolist() == stream
    assert len(ds) == 2  # windows of 4 + 1 tokens every 4; tokens 9 and the last EOS are left over
    assert ds[0][0].tolist() == [1, 2, 3, 0] and ds[0][1].tolist() == [2, 3, 0, 4]
    assert ds[1][0].tolist() == [4, 5, 6, 7] and ds[1][1].tolist() == [5, 6, 7, 0]
    # A lone document gets no EOS, as a single .txt file.
    assert pack_documents([[1, 2, 3]], 2, eos_id=0).ids.tolist() == [1, 2, 3]


def test_chunk_documents_overflows_and_pads_short_chunks():
    docs = [list(range(1, 11)), [20, 21, 22], [30]]  # 10 tokens, 3 tokens, 1 token
    ds = chunk_documents(docs, context_length=4, pad_id=0)
    assert ds.doc_index.tolist() == [0, 0, 0, 1]  # the 1-token document has nothing to predict
    items = [(x.tolist(), y.tolist()) for x, y in (ds[i] for i in range(len(ds)))]
    assert items == [
        ([1, 2, 3, 4], [2, 3, 4, 5]),
        ([5, 6, 7, 8], [6, 7, 8, 9]),
        ([9, 0, 0, 0], [10, -100, -100, -100]),  # the overflow: padded, padding ignored by the loss
        ([20, 21, 0, 0], [21, 22, -100, -100]),
    ]
    targets = [t for _, y in items for t in y if t != -100]
    assert targets == list(range(2, 11)) + [21, 22]  # every token but a document's first, once
    full = chunk_documents(docs, context_length=4, keep_short=False)
    assert full.doc_index.tolist() == [0, 0]


def test_chunk_documents_with_stride_overlaps_chunks():
    ds = chunk_documents([list(range(10))], context_length=4, stride=2, pad_id=99)
    assert [ds[i][0].tolist() for i in range(len(ds))] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7],
                                                           [6, 7, 8, 99]]
    assert ds[3][1].tolist() == [7, 8, 9, -100]
    # No extra chunk when the last full one already reaches the end.
    assert len(chunk_documents([list(range(9))], context_length=4, stride=2)) == 3
    with pytest.raises(ValueError, match="stride"):
        chunk_documents([[1, 2]], context_length=4, stride=4)


def test_split_documents_cuts_after_each_eos():
    ids = np.array([1, 2, EOS_ID, 3, EOS_ID, 4], dtype=np.uint16)
    assert [d.tolist() for d in split_documents(ids)] == [[1, 2, EOS_ID], [3, EOS_ID], [4]]
    assert [d.tolist() for d in split_documents(ids[:2])] == [[1, 2]]


# --- train / validation split ------------------------------------------------------------------

def test_split_tokens_is_the_tutorials_ratio_split():
    ids = np.arange(5145)
    train, val = split_tokens(ids, 0.1, 256)
    assert (len(train), len(val)) == (int(0.9 * 5145), 5145 - int(0.9 * 5145)) == (4630, 515)
    assert np.shares_memory(train, ids) and train[-1] + 1 == val[0]


@pytest.mark.parametrize("n,val_ratio,message", [
    (600, 0.1, r"validation split has 60 of the corpus's 600 tokens .* 257 .* smaller context length "
               r"or a larger validation ratio"),
    (600, 0.9, r"training split has 60 of the corpus's 600 tokens .* smaller validation ratio"),
    (300, 0.5, r"corpus has 300 tokens, fewer than the 2 x 257 .* smaller context length"),
])
def test_split_tokens_refuses_a_part_without_one_window(n, val_ratio, message):
    with pytest.raises(ValueError, match=message):
        split_tokens(np.arange(n), val_ratio, 256)


@pytest.mark.parametrize("val_ratio", [0.0, 1.0, -0.1])
def test_split_tokens_refuses_a_ratio_outside_0_1(val_ratio):
    with pytest.raises(DataError, match="between 0 and 1"):
        split_tokens(np.arange(1000), val_ratio, 8)


def test_split_with_exactly_one_window_each():
    train, val = split_tokens(np.arange(18), 0.5, 8)
    assert len(TokenWindowDataset(train, 8, 8)) == len(TokenWindowDataset(val, 8, 8)) == 1


# --- reading sources ---------------------------------------------------------------------------

def test_iter_documents_of_each_source_type(tmp_path):
    assert list(iter_documents(write(tmp_path / "a.txt", "one\ntwo\n"))) == ["one\ntwo\n"]
    books = tmp_path / "books"
    write(books / "b.txt", "second")
    write(books / "a.txt", "first")
    write(books / "empty.txt", "")
    write(books / "notes.md", "not a .txt")
    assert list(iter_documents(books)) == ["first", "second"]
    big = "x" * 200_000  # beyond the csv module's default 128 KiB field limit
    write(tmp_path / "notes.csv", f'HADM_ID,TEXT\n1,"Admission Date:\n""chest pain"""\n2,{big}\n3,\n')
    assert list(iter_documents(tmp_path / "notes.csv")) == ['Admission Date:\n"chest pain"', big]
    assert list(iter_documents(tmp_path / "notes.csv", text_column="HADM_ID")) == ["1", "2", "3"]
    write(tmp_path / "d.jsonl", '{"text": "alpha", "id": 1}\n\n{"text": "beta\\n"}\n')
    assert list(iter_documents(tmp_path / "d.jsonl")) == ["alpha", "beta\n"]
    write(tmp_path / "e.jsonl", '{"body": "gamma"}\n')
    assert list(iter_documents(tmp_path / "e.jsonl", text_column="body")) == ["gamma"]


def test_text_is_read_as_open_reads_it(tmp_path):
    """CRLF and CR become \\n (universal newlines); a UTF-8 byte-order mark is dropped."""
    path = write(tmp_path / "win.txt", b"\xef\xbb\xbfline one\r\nline two\rend")
    assert list(iter_documents(path)) == [path.read_text(encoding="utf-8-sig")] == ["line one\nline two\nend"]
    write(tmp_path / "bom.csv", b"\xef\xbb\xbfTEXT\r\nhello\r\n")
    assert list(iter_documents(tmp_path / "bom.csv")) == ["hello"]


@pytest.mark.parametrize("name,content,message", [
    ("gone.txt", None, r"gone\.txt: no such file or directory"),
    ("empty.txt", "", r"empty\.txt: the file is empty"),
    ("empty.csv", "", r"empty\.csv: the file is empty"),
    ("bom.txt", b"\xef\xbb\xbf", r"bom\.txt: contains no text"),
    ("header.csv", "TEXT\n", r"header\.csv: contains no text"),
    ("latin1.txt", b"caf\xc3\xa9\nna\xefve\n", r"latin1\.txt: not valid UTF-8 at byte 8 \(line 2"),
    ("latin1.csv", b"TEXT\nok\ncaf\xe9\n", r"latin1\.csv: not valid UTF-8 at byte 11 \(line 3"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"latin1\.jsonl: not valid UTF-8 at byte 25 \(line 2"),
    ("notes.csv", "HADM_ID,BODY\n1,x\n", r"no column named 'text'; its columns are: "
                                         r"HADM_ID, BODY \(choose one with --text-column\)"),
    ("short.csv", "ID,TEXT\n1,a\n2\n", r"short\.csv: line 3 has 1 fields, no column 'TEXT'"),
    ("bad.jsonl", '{"text": "a"}\n{"text": \n', r"bad\.jsonl: line 2 is not valid JSON"),
    ("list.jsonl", "[1, 2]\n", r"line 1 is a JSON list, not an object"),
    ("nofield.jsonl", '{"body": "a", "id": 1}\n', r"line 1 has no field 'text'; its fields are: body, id"),
    ("num.jsonl", '{"text": 3}\n', r"line 1: field 'text' is int, not a string"),
    ("data.xml", "<a/>", r"unsupported file type '\.xml'"),
])
def test_bad_sources_name_the_file_and_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=message):
        list(iter_documents(path))


def test_csv_without_the_named_column_lists_its_columns(tmp_path):
    path = write(tmp_path / "notes.csv", "HADM_ID,TEXT\n1,x\n")
    with pytest.raises(DataError, match=r"notes\.csv: no column 'text'; its columns are: HADM_ID, TEXT"):
        list(iter_documents(path, text_column="text"))


def test_a_text_column_is_refused_for_text_files_and_empty_directories(tmp_path):
    with pytest.raises(DataError, match="applies to .csv and .jsonl files only"):
        list(iter_documents(write(tmp_path / "a.txt", "x"), text_column="TEXT"))
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"none: no \.txt files in this directory"):
        list(iter_documents(tmp_path / "none"))


# --- the token cache ---------------------------------------------------------------------------

def test_load_token_ids_joins_documents_with_eos(tokenizer, tmp_path):
    write(tmp_path / "docs.jsonl", '{"text": "Hello world"}\n{"text": "Every effort"}\n{"text": ""}\n')
    ids = load_token_ids(tmp_path / "docs.jsonl", tokenizer)
    assert ids.tolist() == tokenizer.encode("Hello world") + [EOS_ID] + tokenizer.encode("Every effort") + [EOS_ID]
    assert [d[:-1].tolist() for d in split_documents(ids)] == [tokenizer.encode("Hello world"),
                                                                tokenizer.encode("Every effort")]
    one = load_token_ids(write(tmp_path / "one.txt", "Hello world<|endoftext|>Bye"), tokenizer)
    assert one.tolist() == tokenizer.encode("Hello world<|endoftext|>Bye", allowed_special="all")


def test_large_text_is_tokenized_in_pieces_to_the_same_ids(tokenizer, tmp_path, monkeypatch):
    """Pieces cut before a newline that follows a non-space character, in many small batches,
    give exactly the ids of the whole text, whatever its whitespace."""
    monkeypatch.setattr(documents, "_PIECE_CHARS", 40)
    monkeypatch.setattr(token_cache, "_BATCH_CHARS", 200)
    rng = np.random.default_rng(0)
    atoms = np.array(["word", " Word", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "'s", "42", ".", "é", "\u00a0",
                      "<|endoftext|>"])
    text = "".join(rng.choice(atoms, size=5000))
    path = write(tmp_path / "big.txt", text)
    assert len(list(documents._txt_pieces(path))) > 50
    ids = load_token_ids(path, tokenizer)
    assert ids.tolist() == tokenizer.encode(path.read_text(encoding="utf-8"), allowed_special="all")


def test_the_cache_is_reused_and_rebuilt_when_the_source_changes(tokenizer, tmp_path, monkeypatch):
    path = write(tmp_path / "story.txt", STORY)
    first = load_token_ids(path, tokenizer)
    bin_path, json_path = tmp_path / "story.txt.tokens.bin", tmp_path / "story.txt.tokens.json"
    header = json.loads(json_path.read_text())
    assert header["count"] == len(first) == bin_path.stat().st_size // 2
    assert header["inputs"][0]["sha256"] == hashlib.sha256(STORY.encode()).hexdigest()
    assert header["tokenizer"] == "gpt2"

    tokenized = []
    real_encode = token_cache._encode
    monkeypatch.setattr(token_cache, "_encode", lambda *a: tokenized.append(1) or real_encode(*a))
    assert load_token_ids(path, tokenizer).tolist() == first.tolist() and tokenized == []
    os.utime(path, ns=(1, 1))  # touched: same bytes, new mtime -> still reused
    load_token_ids(path, tokenizer)
    assert tokenized == []

    write(path, STORY + "One more line.")
    changed = load_token_ids(path, tokenizer).tolist()
    assert tokenized == [1] and changed == tokenizer.encode(STORY + "One more line.")
    # A truncated .bin is rebuilt, not trusted (written as a new file: the old one is still mapped).
    write(tmp_path / "cut.bin", bin_path.read_bytes()[:-2]).replace(bin_path)
    assert load_token_ids(path, tokenizer).tolist() == changed and tokenized == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["story.txt", "story.txt.tokens.bin",
                                                          "story.txt.tokens.json"]


def test_the_cache_of_a_directory_or_csv_follows_its_inputs_and_settings(tokenizer, tmp_path):
    books = tmp_path / "books"
    write(books / "a.txt", "first")
    assert load_token_ids(books, tokenizer).tolist() == tokenizer.encode("first")
    assert (tmp_path / "books.tokens.json").is_file()
    write(books / "b.txt", "second")  # a new file in the directory
    assert load_token_ids(books, tokenizer).tolist() == (tokenizer.encode("first") + [EOS_ID]
                                                         + tokenizer.encode("second") + [EOS_ID])
    path = write(tmp_path / "notes.csv", "ID,TEXT\n7,seven\n")
    assert load_token_ids(path, tokenizer).tolist() == tokenizer.encode("seven")
    assert load_token_ids(path, tokenizer, text_column="ID").tolist() == tokenizer.encode("7")


def test_the_cache_falls_back_to_the_user_cache_dir(tokenizer, tmp_path, monkeypatch):
    source = write(tmp_path / "ro" / "story.txt", STORY)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    writable = token_cache._writable
    monkeypatch.setattr(token_cache, "_writable", lambda d: d != source.parent and writable(d))  # read-only disk
    ids = load_token_ids(source, tokenizer)
    assert ids.tolist() == tokenizer.encode(STORY)
    cached = list((tmp_path / "xdg" / "minigpt").glob("*-story.txt.tokens.*"))
    assert sorted(p.suffix for p in cached) == [".bin", ".json"]
    assert sorted(p.name for p in source.parent.iterdir()) == ["story.txt"]


def test_load_token_ids_reports_bad_sources(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such file or directory \(named corpora: the-verdict, "
                                        r"tinyshakespeare\)"):
        load_token_ids(tmp_path / "nope.txt", tokenizer)
    with pytest.raises(DataError, match="the file is empty"):
        load_token_ids(write(tmp_path / "empty.txt", ""), tokenizer)
    assert not list(tmp_path.glob("*.tokens.*"))


def test_a_too_short_corpus_is_an_error_through_the_whole_path(tokenizer, tmp_path):
    ids = load_token_ids(write(tmp_path / "tiny.txt", "Every effort moves you"), tokenizer)
    with pytest.raises(DataError, match=r"corpus has 4 tokens, fewer than the 2 x 17"):
        split_tokens(ids, 0.1, 16)


# --- named corpora and downloads ---------------------------------------------------------------

def test_named_corpus_lookup(tmp_path, monkeypatch):
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    write(env_dir / "tinyshakespeare.txt", "from env")
    write(arg_dir / "tinyshakespeare.txt", "from arg")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(env_dir))
    assert resolve_corpus("tinyshakespeare") == env_dir / "tinyshakespeare.txt"
    assert resolve_corpus("tinyshakespeare", data_dir=arg_dir) == arg_dir / "tinyshakespeare.txt"
    monkeypatch.delenv("MINIGPT_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "data" / "the-verdict.txt", "local")
    assert resolve_corpus("the-verdict") == Path("data") / "the-verdict.txt"
    assert resolve_corpus(env_dir / "tinyshakespeare.txt") == env_dir / "tinyshakespeare.txt"


@pytest.fixture
def http_dir(tmp_path):
    """A directory served by a local http.server: yields (directory, base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_corpus(monkeypatch):
    """A named corpus "fake" whose published file is `content`."""
    content = b"A tiny published corpus.\n" * 100
    corpus = data.Corpus("fake.txt", "https://example.invalid/fake.txt", hashlib.sha256(content).hexdigest())
    monkeypatch.setitem(data.NAMED_CORPORA, "fake", corpus)
    return content


def test_download_from_a_mirror_checks_sha256(tmp_path, http_dir, fake_corpus, monkeypatch):
    served, url = http_dir
    write(served / "fake.txt", fake_corpus)
    monkeypatch.setenv("MINIGPT_DATA_URL", url)
    path = resolve_corpus("fake", data_dir=tmp_path / "data")
    assert path == tmp_path / "data" / "fake.txt" and path.read_bytes() == fake_corpus
    assert os.listdir(tmp_path / "data") == ["fake.txt"]  # no temporary file left
    write(served / "fake.txt", b"something else")  # the existing copy is used, no new download
    assert resolve_corpus("fake", data_dir=tmp_path / "data").read_bytes() == fake_corpus


def test_a_download_with_the_wrong_sha256_is_not_kept(tmp_path, http_dir, fake_corpus):
    served, url = http_dir
    write(served / "fake.txt", fake_corpus + b"tampered")
    with pytest.raises(DataError, match=r"fake: the file downloaded from http://127\.0\.0\.1:\d+/fake\.txt has "
                                        r"sha256 [0-9a-f]{64}, expected .* it was not saved"):
        resolve_corpus("fake", data_dir=tmp_path / "data", base_url=url)
    assert os.listdir(tmp_path / "data") == []


def test_missing_and_unreachable_downloads_say_where_to_put_the_file(tmp_path, http_dir, fake_corpus):
    _, url = http_dir  # serves an empty directory: 404
    dest = tmp_path / "data" / "fake.txt"
    with pytest.raises(DataError, match=rf"{dest} does not exist and downloading it from {url}/fake\.txt failed "
                                        r"\(HTTPError: HTTP Error 404.*save it as .*fake\.txt"):
        resolve_corpus("fake", data_dir=tmp_path / "data", base_url=url)
    with socket.socket() as s:  # a port nobody listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=r"Offline\? Download https://example\.invalid/fake\.txt yourself and "
                                        rf"save it as {dest}, or point --data-dir / MINIGPT_DATA_DIR"):
        resolve_corpus("fake", data_dir=tmp_path / "data", base_url=f"http://127.0.0.1:{port}")
    assert os.listdir(tmp_path / "data") == []


def test_the_published_the_verdict_downloads_with_its_hash(tmp_path, http_dir):
    """A mirror of the real file (from $MINIGPT_DATA_DIR) passes the recorded sha256."""
    served, url = http_dir
    write(served / "the-verdict.txt", shared_corpus("the-verdict").read_bytes())
    path = resolve_corpus("the-verdict", data_dir=tmp_path / "data", base_url=url)
    assert path.stat().st_size == 20479


def test_tinyshakespeare_hash(tokenizer):
    path = shared_corpus("tinyshakespeare")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.NAMED_CORPORA["tinyshakespeare"].sha256


def test_csv_is_parsed_strictly_naming_the_line(tmp_path):
    from minigpt.documents import iter_documents

    bad = {'text\n"ok"\n"never closed\nmore\n': 'line 3: a quoted field is never closed',
           'text\n"ok"\n"closed" then text\n': "line 3: ',' expected after '\"'"}
    for i, (content, message) in enumerate(bad.items()):
        path = tmp_path / f"bad{i}.csv"
        path.write_text(content)
        with pytest.raises(DataError, match=f"^{path}: {message}"):
            list(iter_documents(path))


def test_whitespace_only_text_is_no_text(tmp_path):
    from minigpt.documents import iter_documents

    path = tmp_path / "blank.txt"
    path.write_text("  \n\t \n")
    with pytest.raises(DataError, match=f"^{path}: contains no text \\(only whitespace\\)$"):
        list(iter_documents(path))
