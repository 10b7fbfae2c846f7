"""Small file helpers: atomic writes, atomic folder swaps and content hashes.

Every file curate writes goes to a temporary name in the same directory first, is flushed to disk
(``fsync``) and is renamed into place, so neither a killed run nor a lost machine leaves a
half-written file under a final name. A write that fails because the disk is full or the file is
over the process's size limit raises :class:`DiskFull` (a :class:`~curate.errors.CurateError`) naming
the path and the bytes written; the temporary file is removed and the file under the final name, if
any, is left as it was. :func:`swap_dir` puts a finished folder in place of an old one.

Files and folders curate makes get the permissions the user's umask gives (``0o666 & ~umask`` for a
file, ``0o777 & ~umask`` for a folder, as ``open`` and ``mkdir`` do): the temporary files are made by
:func:`temp_file` and :func:`temp_dir`, not by :mod:`tempfile`, whose 0600 / 0700 would carry over to
the final names.

The store may live at an fsspec URL (``s3://bucket/store``, ``gs://…``): :func:`location` gives a
``pathlib``-like path for either kind, and :func:`atomic_path` writes a file for a URL locally first,
then uploads it whole (one PUT, or a multipart upload that becomes visible only when complete: an
object store shows an object whole or not at all, so no rename is needed).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError

#: errno values that mean "no room for these bytes"
NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class DiskFull(CurateError):
    """A write failed for lack of room: the disk or quota is full, or the file is over the size limit."""

    def __init__(self, path: Path, written: int, cause: OSError):
        reason = os.strerror(cause.errno) if cause.errno else str(cause)
        super().__init__(f"{path}: disk full / file too large ({reason}) after {written} bytes were written; "
                         "nothing was put under that name (what was there before is unchanged). "
                         "Free space or raise the limit, then run again.")
        self.path = Path(path)
        self.written = written
        self.errno = cause.errno


def no_room(exc: BaseException) -> bool:
    """True for an OSError (Python's or pyarrow's, which sets errno too) that means the disk is full."""
    return isinstance(exc, OSError) and exc.errno in NO_ROOM


def temp_file(folder: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> Path:
    """Create a new empty file ``<folder>/<prefix><random><suffix>`` with mode ``0o666 & ~umask`` (the
    mode ``open`` gives; :func:`tempfile.mkstemp` would give 0600) and return its path."""
    folder = Path(folder)
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(folder / prefix))


def temp_dir(folder: str | os.PathLike, prefix: str) -> Path:
    """Create a new empty folder ``<folder>/<prefix><random>`` with mode ``0o777 & ~umask`` (the mode
    ``mkdir`` gives; :func:`tempfile.mkdtemp` would give 0700) and return its path."""
    folder = Path(folder)
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(6)}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(folder / prefix))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_url(path: Any) -> bool:
    """True for an fsspec URL other than a local file (``s3://b/x``, ``gs://…``, ``memory://…``)."""
    if hasattr(path, "protocol") and hasattr(path, "fs"):  # a UPath
        return path.protocol not in ("", "file", "local")
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    head, sep, _ = text.partition("://")
    return bool(sep) and head.isidentifier() and head not in ("file", "local")


def location(path: str | os.PathLike) -> Path:
    """A ``pathlib.Path`` for a local path; for an fsspec URL a ``upath.UPath`` (same methods: ``/``,
    ``glob``, ``exists``, ``read_text``, ``stat``, ``open``, ``rename``) over that URL's file system.
    Credentials and endpoints come from the file system's usual settings (for S3: ``AWS_*`` variables
    or ``~/.aws``), so nothing secret is written into a flow file."""
    if not is_url(path):
        text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        return Path(text[len("file://"):] if text.startswith("file://") else text)
    if hasattr(path, "fs"):
        return path  # type: ignore[return-value]
    try:
        from upath import UPath
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise CurateError(f"{path}: a URL store needs universal_pathlib (pip install universal_pathlib)") from exc
    try:
        return UPath(str(path))
    except (ImportError, ValueError) as exc:
        proto = str(path).partition("://")[0]
        hint = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(proto, f"the fsspec package for {proto}://")
        raise CurateError(f"{path}: no file system for {proto}:// ({exc}); install {hint}") from exc


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None, **kwargs: Any) -> pa.Table:
    """``pyarrow.parquet.read_table`` for a local path or a URL (through its fsspec file system)."""
    if is_url(path):
        loc = location(path)
        return pq.read_table(loc.path, columns=columns, filesystem=loc.fs, **kwargs)
    return pq.read_table(path, columns=columns, **kwargs)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, flush it to disk and rename it
    onto ``path``. On failure the temporary file is removed; lack of room raises :class:`DiskFull`.
    For a URL the temporary file is local (the system's temp folder) and is uploaded whole to ``path``
    when the block succeeds; :class:`DiskFull` is not raised there."""
    if is_url(path):
        remote = location(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{remote.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            remote.fs.put_file(tmp, remote.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_file(path.parent, prefix=f".{path.name}.")  # 0o666 & ~umask, kept by the rename
    try:
        try:
            yield tmp_path
            _fsync(tmp_path)
        except OSError as exc:
            if not no_room(exc):
                raise
            written = tmp_path.stat().st_size if tmp_path.exists() else 0
            raise DiskFull(path, written, exc) from exc
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this filesystem or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished folder ``new`` at ``final`` and delete the folder that was there.

    Where the kernel can exchange two names in one step (Linux ``renameat2``), ``final`` always names
    either the whole old folder or the whole new one. Elsewhere the old folder is first renamed to
    ``.<name>.old`` and the new one renamed in: a crash between the two renames leaves the old folder
    under ``.<name>.old`` and no ``final``, never a mix of both."""
    new, final = Path(new), Path(final)
    if not final.exists():
        os.replace(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new)  # holds the old folder now
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
    return location(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """One JSON object per line (UTF-8, ``\n``), written atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def write_parquet(path: str | os.PathLike, table: pa.Table) -> Path:
    """Write a Parquet file atomically (zstd, no pandas metadata, deterministic bytes)."""
    table = table.replace_schema_metadata(None)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", store_schema=False)
    return location(path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def relpath(path: str | os.PathLike, start: str | os.PathLike) -> str:
    """``path`` relative to ``start`` when below it, else absolute (for manifests and messages)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path(start).resolve()))
    except ValueError:
        return str(p)
