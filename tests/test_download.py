"""Downloading OpenAI's GPT-2 files, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest
from http_server import serving

from minigpt.files import fetch
from minigpt.weights import DownloadError, default_models_dir, download_gpt2_files, openai_model_size
from minigpt.weights.download import GPT2_FILES

DATA = "model.ckpt.data-00000-of-00001"


@pytest.fixture
def server():
    with serving() as srv:
        yield srv


def publish(srv, prefix: str = "/models") -> dict[str, bytes]:
    """Put GPT-2 124M's seven files (made-up contents) on the server under `prefix`."""
    contents = {name: (name.encode() * 2000)[: 1000 + 37 * i] for i, name in enumerate(GPT2_FILES)}
    contents[DATA] = bytes(range(256)) * 1200  # 300 KB
    srv.files.update({f"{prefix}/124M/{name}": data for name, data in contents.items()})
    return contents


def test_downloads_every_file(server, tmp_path):
    contents = publish(server)
    model_dir = download_gpt2_files("gpt2", tmp_path, base_url=server.url + "/models")
    assert model_dir == tmp_path / "124M"
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == contents  # no .part left behind


def test_files_already_present_are_not_fetched(server, tmp_path):
    publish(server)
    (tmp_path / "124M").mkdir()
    (tmp_path / "124M" / DATA).write_bytes(b"mine")
    download_gpt2_files("124M", tmp_path, base_url=server.url + "/models")
    assert (tmp_path / "124M" / DATA).read_bytes() == b"mine"
    assert len(server.requests) == len(GPT2_FILES) - 1
    assert not any(path.endswith(DATA) for path, _ in server.requests)
    download_gpt2_files("124M", tmp_path, base_url=server.url + "/models")
    assert len(server.requests) == len(GPT2_FILES) - 1


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    contents = publish(server)
    server.cut_once.add(f"/models/124M/{DATA}")
    download_gpt2_files("124M", tmp_path, base_url=server.url + "/models")
    assert (tmp_path / "124M" / DATA).read_bytes() == contents[DATA]
    data_requests = [rng for path, rng in server.requests if path.endswith(DATA)]
    assert data_requests == [None, f"bytes={len(contents[DATA]) // 2}-"]


def test_interrupted_run_keeps_only_the_part_file_then_resumes(server, tmp_path):
    data = publish(server)[DATA]
    url, dest = f"{server.url}/models/124M/{DATA}", tmp_path / DATA
    server.cut_once.add(f"/models/124M/{DATA}")
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(url, dest, attempts=1)
    assert not dest.exists()
    assert (tmp_path / (DATA + ".part")).stat().st_size == len(data) // 2
    fetch(url, dest)
    assert dest.read_bytes() == data
    assert server.requests[-1][1] == f"bytes={len(data) // 2}-"


def test_server_without_range_support_restarts(server, tmp_path):
    data = publish(server)[DATA]
    server.ignore_range = True
    (tmp_path / (DATA + ".part")).write_bytes(data[:1000])
    fetch(f"{server.url}/models/124M/{DATA}", tmp_path / DATA)
    assert (tmp_path / DATA).read_bytes() == data


def test_part_file_longer_than_the_file_restarts(server, tmp_path):
    data = publish(server)[DATA]
    (tmp_path / (DATA + ".part")).write_bytes(data + b"junk")
    fetch(f"{server.url}/models/124M/{DATA}", tmp_path / DATA)
    assert (tmp_path / DATA).read_bytes() == data


def test_wrong_size_never_gets_the_final_name(server, tmp_path):
    data = publish(server)[DATA]
    server.cut_always.add(f"/models/124M/{DATA}")
    with pytest.raises(DownloadError, match=rf"received \d+ bytes, the server announced {len(data)}"):
        download_gpt2_files("124M", tmp_path, base_url=server.url + "/models")
    assert not (tmp_path / "124M" / DATA).exists()
    assert (tmp_path / "124M" / "hparams.json").exists()  # the other files still arrived


def test_404_falls_back_to_the_mirror(server, tmp_path):
    contents = publish(server, "/mirror")
    publish(server, "/models")
    del server.files[f"/models/124M/{DATA}"]
    with pytest.raises(DownloadError, match=rf"{DATA}: {server.url}/models/124M/{DATA} \(HTTP 404"):
        download_gpt2_files("124M", tmp_path / "a", base_url=server.url + "/models")
    download_gpt2_files("124M", tmp_path / "b", base_url=server.url + "/models",
                        mirror_url=server.url + "/mirror/")
    assert (tmp_path / "b" / "124M" / DATA).read_bytes() == contents[DATA]


def test_offline_error_lists_files_urls_and_the_alternative(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DownloadError) as info:
        download_gpt2_files("355M", tmp_path, base_url=dead)
    message = str(info.value)
    assert f"could not download {len(GPT2_FILES)} of GPT-2 355M's files" in message
    for name in GPT2_FILES:
        assert f"{name}: {dead}/355M/{name} (" in message
    assert "Pass a directory that already holds them" in message


def test_model_names_and_sizes(monkeypatch, tmp_path):
    names = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M", "774M": "774M"}
    assert {n: openai_model_size(n) for n in names} == names
    with pytest.raises(ValueError, match=r"unknown GPT-2 model size '125M'; choose one of \['124M'"):
        openai_model_size("125M")
    with pytest.raises(ValueError, match="unknown GPT-2 model size 'tiny'"):
        openai_model_size("tiny")  # a preset, but not a published checkpoint
    monkeypatch.setenv("MINIGPT_MODELS_DIR", str(tmp_path))
    assert default_models_dir() == tmp_path
    monkeypatch.delenv("MINIGPT_MODELS_DIR")
    assert default_models_dir().parts[-3:] == (".cache", "minigpt", "gpt2")
