"""Writing files so that a crash never leaves half of one, and downloading them the same way.

`atomic_file` and `atomic_dir` write under a temporary name in the destination's directory and
rename into place only when the block succeeds; a directory replaces an existing one in one atomic
exchange where the system has it (Linux), and `clean_leftovers` tidies what a killed writer left.
`lock_dir` holds an exclusive OS lock on a directory, released when its process ends.
`download` fetches into `<dest>.part`, resumes an interrupted transfer with an HTTP Range request,
checks the size (and the sha256 when known) and only then renames the file to `dest`; it falls
back to mirrors, and explains what to do when every source fails.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import http.client
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from .errors import DirectoryInUse, DownloadError, StorageError

CHUNK = 1 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file opened for writing ("wb", or "w" for UTF-8 text) that becomes `path` only if the
    block completes: on any error `path` is left as it was and no temporary file remains."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a whole new file: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `path` only if the block succeeds.

    An existing `path` is replaced so that a complete `path` exists at every instant (an atomic
    exchange; elsewhere two renames, undone by `clean_leftovers` if interrupted between them).
    On error the temporary directory is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            _fsync_file(f)
        if path.exists() and _exchange(tmp, path):
            _fsync_dir(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old content
            return
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_cwd, exchange = -100, 2
    if rename(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def remove_dir(path: Path) -> None:
    """Delete a directory so that it never exists half-deleted under its name: renamed away first."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
    os.replace(path, doomed)
    _delete(doomed)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(directory: Path) -> list[str]:
    """Tidy what interrupted `atomic_dir`s, `atomic_file`s and `remove_dir`s left in `directory`:
    a replaced directory whose successor never arrived is put back, the rest deleted.
    Returns the names put back. Call it only while no other process writes there."""
    restored = []
    if not directory.is_dir():
        return restored
    for p in sorted(directory.iterdir()):
        m = re.fullmatch(r"\.(.+)\.(tmp|old|del)-\w+", p.name)
        if m is None:
            continue
        target = directory / m[1]
        if m[2] == "old" and not target.exists():
            os.replace(p, target)
            restored.append(target.name)
        else:
            _delete(p)
    return restored


LOCK_FILE = ".lock"


def lock_dir(directory: Path) -> IO:
    """An exclusive lock on `directory` (`flock` on its `.lock` file), held until the returned file
    is closed or the process ends, however it ends; `DirectoryInUse` if another process holds it."""
    import fcntl  # POSIX only

    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DirectoryInUse(f"{directory} is in use by another run ({holder}); wait for it to finish "
                             "or pick another --out-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


_STORAGE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large",
                   errno.EDQUOT: "disk quota exceeded"}


def storage_problem(error: BaseException) -> str | None:
    """"no space left on device" / "file too large" / "disk quota exceeded" if `error` is such a
    write failure (an OSError, or a library's message quoting "os error N"), else None."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and (m := re.search(r"os error (\d+)", str(error))):
        code = int(m[1])
    return _STORAGE_ERRORS.get(code)


def check_storage(error: BaseException, path: Path, consequence: str = "") -> None:
    """Raise a one-line `StorageError` naming `path` (and the `consequence`) if `error` is a full
    disk or a size limit."""
    problem = storage_problem(error)
    if problem is not None:
        raise StorageError(f"{path}: {problem}" + (f" ({consequence})" if consequence else "")) from error


class HashingWriter:
    """A binary file's `write`, also hashing (sha256) what it writes and keeping the first OSError
    (a library writing through it may report that error as something vaguer)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.digest, self.error = f, hashlib.sha256(), None

    def write(self, data: bytes) -> int:
        try:
            written = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.digest.update(data)
        return written

    def flush(self) -> None:
        self.f.flush()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
          desc: str | None = None, attempts: int = 3, timeout: float = 60.0) -> Path:
    """Download one URL to `dest` via `dest.part`, resuming after interruptions; return `dest`.

    Raises urllib's `HTTPError` / `URLError` when the server answers with an error or cannot be
    reached, and `DownloadError` when `attempts` transfers all came up short (the `.part` file
    stays, to resume from) or the file has another size or sha256 than expected (deleted).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    problem = ""
    for _ in range(attempts):
        start = part.stat().st_size if part.exists() else 0
        try:
            total = _transfer(url, part, start, size, desc or dest.name, timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and start:  # our .part is not a prefix of the file: start over
                part.unlink()
                problem = f"{part.name} did not match the file on the server"
                continue
            raise
        except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
            # Interrupted mid-transfer: what arrived stays in .part and the next attempt resumes.
            problem = f"transfer interrupted ({type(e).__name__}: {e})"
            continue
        received = part.stat().st_size
        if total is None or received == total:
            _check_sha256(part, sha256, url)
            _fsync_file(part)
            os.replace(part, dest)
            return dest
        problem = f"received {received} bytes, the server announced {total}"
        if received > total:
            part.unlink()
    resume = f"; run again to resume from {part}" if part.exists() else ""
    raise DownloadError(f"{url}: {problem} (after {attempts} attempts){resume}")


def _transfer(url: str, part: Path, start: int, size: int | None, desc: str, timeout: float) -> int | None:
    """Append the rest of `url` from byte `start` to `part` (or rewrite it); the full size if known."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total, resumed = _expected_size(response, start, url)
        if size is not None and total is not None and total != size:
            raise DownloadError(f"{url}: the server announced {total} bytes, expected {size}")
        total = size if total is None else total
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=start if resumed else 0, unit="B", unit_scale=True,
                     unit_divisor=1024, desc=desc) as bar:
            while block := response.read(CHUNK):
                f.write(block)
                bar.update(len(block))
    return total


def _expected_size(response: http.client.HTTPResponse, start: int, url: str) -> tuple[int | None, bool]:
    """The file's full size (None if unknown) and whether the response continues `.part`."""
    if start and response.status == 206:
        header = response.headers.get("Content-Range", "")
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", header)
        if m is None or int(m[1]) != start:
            raise DownloadError(f"{url}: asked for bytes {start}- and got Content-Range {header!r}")
        return (None if m[2] == "*" else int(m[2])), True
    length = response.headers.get("Content-Length")
    return (int(length) if length is not None else None), False


def _check_sha256(part: Path, expected: str | None, url: str) -> None:
    if expected is None:
        return
    actual = sha256_file(part)
    if actual != expected.lower():
        part.unlink()
        raise DownloadError(f"the file downloaded from {url} has sha256 {actual}, expected {expected}; "
                            "it was not saved")


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             mirrors: Sequence[str] = (), desc: str | None = None, attempts: int = 3, timeout: float = 60.0,
             advice: str | None = None) -> Path:
    """`fetch` `url` to `dest`, falling back to each of `mirrors` in turn; return `dest`.

    When every source fails, the `DownloadError` lists each URL with what went wrong, then
    `advice` (default: download `url` yourself and save it as `dest`; "" for none).
    """
    failures = []
    for source in (url, *mirrors):
        try:
            return fetch(source, dest, sha256=sha256, size=size, desc=desc, attempts=attempts, timeout=timeout)
        except urllib.error.HTTPError as e:
            failures.append(f"{source} (HTTP {e.code} {e.reason})")
        except urllib.error.URLError as e:  # unreachable: offline, DNS, refused
            failures.append(f"{source} ({e.reason})")
        except DownloadError as e:
            failures.append(str(e))
        # A full disk is an OSError; a malformed URL a ValueError.
        except (OSError, ValueError, http.client.HTTPException) as e:
            failures.append(f"{source} ({type(e).__name__}: {e})")
    if advice is None:
        advice = f"Offline? Download {url} yourself and save it as {dest}"
    raise DownloadError("; ".join(failures) + (f". {advice}" if advice else ""))
