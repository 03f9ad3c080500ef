"""Inputs: directories read recursively, gzip/zstd-compressed files, parquet files and Hugging Face
datasets (local files through `datasets.load_dataset`, `save_to_disk` directories; the hub offline)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt import token_cache
from minigpt.documents import iter_documents
from minigpt.errors import DataError
from minigpt.sources import file_kind, list_inputs
from minigpt.token_cache import load_tokens
from minigpt.tokenizer import EOS_ID

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [{"text": f"Sentence {i}: the quick brown fox.", "title": f"T{i}", "n": i} for i in range(300)]
TEXTS = [r["text"] for r in RECORDS]


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def joined(tokenizer, texts: list[str]) -> list[int]:
    """The ids of several documents, an end-of-text token after each."""
    return [i for t in texts for i in tokenizer.encode(t) + [EOS_ID]]


def write_parquet(path: Path, records: list[dict], row_group_size: int = 64) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def test_file_kinds():
    assert file_kind(Path("a.jsonl.gz")) == (".jsonl", ".gz")
    assert file_kind(Path("Book.TXT.zst")) == (".txt", ".zst")
    assert file_kind(Path("x.parquet")) == (".parquet", "")
    assert file_kind(Path("x.parquet.gz"))[0] == "" and file_kind(Path("notes.md"))[0] == ""


def test_a_directory_is_read_recursively_in_relative_path_order(tokenizer, tmp_path):
    root = tmp_path / "corpus"
    write(root / "b.txt", "bee")
    write(root / "a" / "z.txt", "zed")
    write(root / "a" / "y.jsonl.gz", gzip.compress(jsonl_bytes([{"text": "why"}, {"text": "wye"}])))
    write(root / "a-c.csv", "text\ncsv row\n")
    write(root / "empty.txt", "")
    write(root / "notes.md", "not read")
    write(root / ".hidden.txt", "not read")
    assert [p.relative_to(root).as_posix() for p in list_inputs(root)] == ["a/y.jsonl.gz", "a/z.txt", "a-c.csv",
                                                                           "b.txt"]
    docs = ["why", "wye", "zed", "csv row", "bee"]
    assert list(iter_documents(root)) == docs
    corpus = load_tokens(root, tokenizer, progress=False)
    assert corpus.ids.tolist() == joined(tokenizer, docs) and len(corpus.doc_starts) == 5
    header = json.loads((tmp_path / "corpus.tokens.json").read_text())
    assert [i["name"] for i in header["inputs"]] == ["a/y.jsonl.gz", "a/z.txt", "a-c.csv", "b.txt"]


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_files_read_as_their_plain_selves(tokenizer, tmp_path, monkeypatch, suffix):
    if suffix == ".zst":
        zstandard = pytest.importorskip("zstandard")
        compress = zstandard.ZstdCompressor().compress
    else:
        compress = gzip.compress
    text = "Line one of the book.\r\nLine two, with a tab\tand café.\n" * 500
    txt = write(tmp_path / f"book.txt{suffix}", compress(text.encode()))
    plain = write(tmp_path / "plain" / "book.txt", text)
    data = write(tmp_path / f"s.jsonl{suffix}", compress(jsonl_bytes(RECORDS)))
    monkeypatch.setattr(token_cache, "_SHARD_BYTES", 4000)  # many shards of the decompressed stream
    assert load_tokens(txt, tokenizer, progress=False).ids.tolist() == load_tokens(plain, tokenizer).ids.tolist()
    assert load_tokens(data, tokenizer, workers=2, progress=False).ids.tolist() == joined(tokenizer, TEXTS)
    assert list(iter_documents(data))[:2] == TEXTS[:2]


def test_a_bad_byte_in_a_compressed_file_is_located_in_the_decompressed_text(tokenizer, tmp_path):
    path = write(tmp_path / "bad.txt.gz", gzip.compress(b"good line\ncaf\xe9\n"))
    with pytest.raises(DataError, match=r"bad\.txt\.gz: not valid UTF-8 at byte 13 \(line 2"):
        load_tokens(path, tokenizer, progress=False)


def test_parquet_files_by_column_template_and_row_groups(tokenizer, tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "s.parquet", RECORDS)
    assert list(iter_documents(path)) == TEXTS
    monkeypatch.setattr(token_cache, "_SHARD_BYTES", 2000)  # several row groups, several shards
    assert load_tokens(path, tokenizer, workers=2, progress=False).ids.tolist() == joined(tokenizer, TEXTS)
    corpus = load_tokens(path, tokenizer, template="{title}. {text}", separator="none", progress=False)
    assert corpus.ids.tolist() == [i for r in RECORDS for i in tokenizer.encode(f"{r['title']}. {r['text']}")]
    assert load_tokens(path, tokenizer, text_column="title", progress=False).ids.tolist() == joined(
        tokenizer, [r["title"] for r in RECORDS])


@pytest.mark.parametrize("records,options,message", [
    ([{"body": "a"}], {}, r"s\.parquet: no column named 'text'; its columns are: body \(choose one with --text-column"),
    ([{"text": "a"}], {"template": "{title}: {text}"}, r"s\.parquet: no column 'title' \(used by the template"),
    ([{"text": "a"}, {"text": None}], {}, r"s\.parquet: row 2: column 'text' is null, not a string"),
    ([{"text": "a"}], {"text_column": "nope"}, r"s\.parquet: no column 'nope'; its columns are: text"),
])
def test_bad_parquet_names_the_file_and_the_problem(tokenizer, tmp_path, records, options, message):
    path = write_parquet(tmp_path / "s.parquet", records)
    with pytest.raises(DataError, match=message):
        load_tokens(path, tokenizer, progress=False, **options)


def test_not_a_parquet_file_is_one_line(tokenizer, tmp_path):
    pytest.importorskip("pyarrow")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable parquet file"):
        load_tokens(write(tmp_path / "x.parquet", "PAR1 but not really"), tokenizer, progress=False)


# --- Hugging Face datasets ---------------------------------------------------------------------

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Token caches of datasets in a temporary user cache directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "minigpt"


def test_a_hub_dataset_loads_through_datasets_and_caches_by_fingerprint(tokenizer, tmp_path, monkeypatch, hf_cache):
    """`hf:NAME:CONFIG` calls `datasets.load_dataset(NAME, CONFIG, split="train")`: here a local JSON
    dataset stands in for the hub."""
    datasets = pytest.importorskip("datasets")
    write(tmp_path / "src" / "train.jsonl", jsonl_bytes(RECORDS))
    real, calls = datasets.load_dataset, []

    def local(name, config=None, split=None):
        calls.append((name, config, split))
        return real("json", data_files=str(tmp_path / "src" / "train.jsonl"), split=split,
                    cache_dir=str(tmp_path / "hf"))

    monkeypatch.setattr(datasets, "load_dataset", local)
    corpus = load_tokens("hf:wikipedia:20220301.en", tokenizer, progress=False)
    assert calls == [("wikipedia", "20220301.en", "train")]
    assert corpus.ids.tolist() == joined(tokenizer, TEXTS) and len(corpus.doc_starts) == len(TEXTS)
    cached = sorted(p.name for p in hf_cache.iterdir())
    assert len(cached) == 3 and all("hf_wikipedia_20220301.en.tokens" in n for n in cached)
    header = json.loads(next(hf_cache.glob("*.json")).read_text())
    assert header["inputs"][0]["fingerprint"] and header["inputs"][0]["rows"] == len(RECORDS)
    written = [p.stat().st_mtime_ns for p in hf_cache.iterdir()]
    load_tokens("hf:wikipedia:20220301.en", tokenizer, progress=False)  # reused
    assert [p.stat().st_mtime_ns for p in hf_cache.iterdir()] == written
    titled = load_tokens("hf:wikipedia:20220301.en", tokenizer, text_column="title", progress=False)
    assert titled.ids.tolist() == joined(tokenizer, [r["title"] for r in RECORDS])


def test_parquet_through_datasets_and_a_saved_dataset(tokenizer, tmp_path, monkeypatch, hf_cache):
    datasets = pytest.importorskip("datasets")
    write_parquet(tmp_path / "train.parquet", RECORDS)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "train.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    ds.save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setattr(token_cache, "_SHARD_BYTES", 3000)  # several row slices
    corpus = load_tokens(tmp_path / "saved", tokenizer, template="{n}|{text}", workers=2, progress=False)
    assert corpus.ids.tolist() == joined(tokenizer, [f"{r['n']}|{r['text']}" for r in RECORDS])
    assert list(iter_documents(tmp_path / "saved"))[:1] == TEXTS[:1]
    assert not list((tmp_path / "saved").glob("*.tokens.*")) and list(hf_cache.glob("*saved.tokens.bin"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_tokens(tmp_path / "dict", tokenizer, progress=False).doc_starts) == len(RECORDS)


def test_a_dataset_object_is_cached_by_its_fingerprint(tokenizer, hf_cache):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    assert load_tokens(ds, tokenizer, progress=False).ids.tolist() == joined(tokenizer, TEXTS)
    assert len(list(hf_cache.glob(f"*-dataset-{ds._fingerprint}.tokens.bin"))) == 1
    shorter = ds.select(range(10))
    assert load_tokens(shorter, tokenizer, progress=False).ids.tolist() == joined(tokenizer, TEXTS[:10])


def test_a_dataset_without_the_column_names_its_columns(tokenizer, tmp_path, hf_cache):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["a", "b"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"saved: no column named 'text'; its columns are: body"):
        load_tokens(tmp_path / "saved", tokenizer, progress=False)


def test_the_hub_offline_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    code = ("from minigpt.sources import load_hf_dataset\n"  # what load_tokens calls, without importing torch
            "try:\n    load_hf_dataset('hf:no-such-user/no-such-dataset')\n"
            "except ValueError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout + out.stderr
    assert lines[0].startswith("hf:no-such-user/no-such-dataset: could not load the Hugging Face dataset "
                               "'no-such-user/no-such-dataset', split 'train' (")
    assert "save_to_disk" in lines[0]


def test_missing_extras_are_named(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"needs the zstandard package: pip install 'minigpt\[zstd\]'"):
        load_tokens(write(tmp_path / "a.txt.zst", b"\x28\xb5\x2f\xfd"), tokenizer, progress=False)
    with pytest.raises(ImportError, match=r"needs the pyarrow package: pip install 'minigpt\[parquet\]'"):
        load_tokens(write(tmp_path / "a.parquet", b"PAR1"), tokenizer, progress=False)
