"""The one atomic writer and the one downloader, against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
from http_server import serving

from minigpt.errors import DownloadError
from minigpt.files import atomic_dir, atomic_file, download, sha256_file

DATA = bytes(range(256)) * 400


@pytest.fixture
def server():
    """Serves `/file` and `/mirror/file` (DATA); stops when the test ends."""
    with serving({"/file": DATA, "/mirror/file": DATA}) as srv:
        yield srv


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/file"


SHA = hashlib.sha256(DATA).hexdigest()


def test_download_resumes_a_part_file_with_range_and_checks_sha256(server, tmp_path):
    dest = tmp_path / "sub" / "file.bin"
    dest.parent.mkdir()
    (tmp_path / "sub" / "file.bin.part").write_bytes(DATA[:1000])
    assert download(server.url + "/file", dest, sha256=SHA, size=len(DATA)) == dest
    assert dest.read_bytes() == DATA and sha256_file(dest) == SHA
    assert server.requests == [("/file", "bytes=1000-")]
    assert os.listdir(dest.parent) == ["file.bin"]


def test_an_interrupted_transfer_resumes_within_the_call(server, tmp_path):
    server.cut_once.add("/file")
    download(server.url + "/file", tmp_path / "f", sha256=SHA)
    assert (tmp_path / "f").read_bytes() == DATA
    assert [rng for _, rng in server.requests] == [None, f"bytes={len(DATA) // 2}-"]


def test_a_sha256_mismatch_deletes_the_part_file_and_names_both_hashes(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(DownloadError, match=rf"has sha256 {SHA}, expected {wrong}; it was not saved"):
        download(server.url + "/file", tmp_path / "f", sha256=wrong)
    assert os.listdir(tmp_path) == []


def test_a_size_other_than_expected_is_refused(server, tmp_path):
    with pytest.raises(DownloadError, match=rf"the server announced {len(DATA)} bytes, expected {len(DATA) + 1}"):
        download(server.url + "/file", tmp_path / "f", size=len(DATA) + 1)
    assert not (tmp_path / "f").exists()


def test_mirrors_are_tried_in_turn(server, tmp_path):
    dest = download(server.url + "/gone", tmp_path / "f", mirrors=[dead_url(), server.url + "/mirror/file"])
    assert dest.read_bytes() == DATA
    assert [path for path, _ in server.requests] == ["/gone", "/mirror/file"]


def test_offline_names_every_url_and_where_to_put_the_file(tmp_path):
    url, mirror = dead_url(), dead_url()
    dest = tmp_path / "f"
    with pytest.raises(DownloadError) as info:
        download(url, dest, mirrors=[mirror])
    message = str(info.value)
    assert message.startswith(f"{url} (") and f"; {mirror} (" in message
    assert message.endswith(f"Offline? Download {url} yourself and save it as {dest}")
    with pytest.raises(DownloadError, match=r"\)$"):
        download(url, dest, advice="")
    assert os.listdir(tmp_path) == []


def test_atomic_file_keeps_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old")
    with pytest.raises(KeyError), atomic_file(path, "w") as f:
        f.write("new, half written")
        raise KeyError("boom")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["notes.txt"]  # no temporary file left
    with atomic_file(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["notes.txt"]
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"), atomic_file(path, "a"):
        pass


def test_atomic_dir_keeps_the_old_directory_when_the_block_fails(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "a").write_text("old")
    with pytest.raises(KeyError), atomic_dir(path) as tmp:
        (tmp / "a").write_text("new")
        raise KeyError("boom")
    assert os.listdir(tmp_path) == ["ckpt"] and (path / "a").read_text() == "old"
    with atomic_dir(path) as tmp:
        (tmp / "b").write_text("new")
    assert os.listdir(tmp_path) == ["ckpt"] and os.listdir(path) == ["b"]


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_replaces_with_or_without_an_atomic_exchange(tmp_path, monkeypatch, exchange):
    import minigpt.files

    if not exchange:
        monkeypatch.setattr(minigpt.files, "_exchange", lambda a, b: False)
    path = tmp_path / "ckpt"
    for content in ("one", "two"):
        with atomic_dir(path) as tmp:
            (tmp / "a").write_text(content)
    assert os.listdir(tmp_path) == ["ckpt"] and (path / "a").read_text() == "two"


def test_the_exchange_swaps_two_directories(tmp_path):
    from minigpt.files import _exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("in a")
    if not _exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert os.listdir(tmp_path / "a") == [] and (tmp_path / "b" / "x").read_text() == "in a"


def test_clean_leftovers_puts_back_an_orphaned_old_copy_and_deletes_the_rest(tmp_path):
    from minigpt.files import clean_leftovers, remove_dir

    for name in (".step-2.old-11", ".step-3.old-12", "step-3", ".step-4.tmp-ab", ".step-1.del-9", "keep"):
        (tmp_path / name).mkdir()
    (tmp_path / ".metrics.jsonl.tmp-x1").write_text("partial")
    assert clean_leftovers(tmp_path) == ["step-2"]
    assert sorted(os.listdir(tmp_path)) == ["keep", "step-2", "step-3"]
    remove_dir(tmp_path / "keep")
    assert sorted(os.listdir(tmp_path)) == ["step-2", "step-3"]
    (tmp_path / "link").symlink_to(tmp_path / "step-3")  # a checkpoint linked from another run
    remove_dir(tmp_path / "link")
    assert sorted(os.listdir(tmp_path)) == ["step-2", "step-3"]


def test_lock_dir_is_exclusive_until_closed(tmp_path):
    from minigpt.errors import DirectoryInUse
    from minigpt.files import lock_dir

    lock = lock_dir(tmp_path / "run")
    with pytest.raises(DirectoryInUse, match=f"in use by another run \\(pid {os.getpid()} on "):
        lock_dir(tmp_path / "run")
    lock.close()
    lock_dir(tmp_path / "run").close()


def test_storage_problems_are_recognised_in_any_form():
    import errno

    from minigpt.errors import StorageError
    from minigpt.files import check_storage, storage_problem

    assert storage_problem(OSError(errno.ENOSPC, "No space left on device")) == "no space left on device"
    assert storage_problem(RuntimeError("I/O error: File too large (os error 27)")) == "file too large"
    assert storage_problem(OSError(errno.EACCES, "Permission denied")) is None
    with pytest.raises(StorageError, match=r"^x.bin: no space left on device \(nothing written\)$"):
        check_storage(OSError(errno.ENOSPC, "full"), "x.bin", "nothing written")
    check_storage(ValueError("other"), "x.bin")  # not a storage problem: nothing raised
