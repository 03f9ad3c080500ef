"""Downloading OpenAI's GPT-2 files, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minigpt.weights import DownloadError, default_models_dir, download_gpt2_files, openai_model_size
from minigpt.weights.download import GPT2_FILES, download_file

DATA = "model.ckpt.data-00000-of-00001"


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files`, with HTTP Range support and injectable faults."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and not srv.ignore_range:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # A fault sends half the announced body and hangs up, as a dropped connection does.
        if self.path in srv.cut_always or self.path in srv.cut_once:
            srv.cut_once.discard(self.path)
            body = body[: len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests = {}, []
    srv.cut_once, srv.cut_always, srv.ignore_range = set(), set(), False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


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
        download_file(url, dest, attempts=1)
    assert not dest.exists()
    assert (tmp_path / (DATA + ".part")).stat().st_size == len(data) // 2
    download_file(url, dest)
    assert dest.read_bytes() == data
    assert server.requests[-1][1] == f"bytes={len(data) // 2}-"


def test_server_without_range_support_restarts(server, tmp_path):
    data = publish(server)[DATA]
    server.ignore_range = True
    (tmp_path / (DATA + ".part")).write_bytes(data[:1000])
    download_file(f"{server.url}/models/124M/{DATA}", tmp_path / DATA)
    assert (tmp_path / DATA).read_bytes() == data


def test_part_file_longer_than_the_file_restarts(server, tmp_path):
    data = publish(server)[DATA]
    (tmp_path / (DATA + ".part")).write_bytes(data + b"junk")
    download_file(f"{server.url}/models/124M/{DATA}", tmp_path / DATA)
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
