"""Where archives live: the few file operations every source uses, for local paths and fsspec URLs alike.

An archive is named by a local path or a URL (``file://``, ``s3://``, ``gs://``, ``https://``, ``memory://`` and
whatever else fsspec knows). Remote ones are authenticated by ``storage_options`` (fsspec keyword arguments such
as ``key``, ``secret``, ``endpoint_url``, ``anon``) and by the standard environment the filesystem reads itself
(``AWS_*`` including ``AWS_ENDPOINT_URL`` for s3fs, ``GOOGLE_APPLICATION_CREDENTIALS`` for gcsfs).

Local paths take the plain ``os``/``open`` route, so local reads cost what they did before; only URLs go
through fsspec. Listings are sorted, so units come in a stable order wherever the archive lives.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from collections.abc import Mapping
from typing import IO

from datasets.sources.base import file_fingerprint

StorageOptions = Mapping[str, object] | None


def is_local(url: str) -> bool:
    """Whether ``url`` is a local path (no protocol, or ``file://``)."""
    return "://" not in url or url.startswith(("file://", "local://"))


def local_path(url: str) -> str:
    """The local path of a local ``url`` (``file:///tmp/x`` -> ``/tmp/x``)."""
    for prefix in ("file://", "local://"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return url


def filesystem(url: str, storage_options: StorageOptions = None):
    """``(fs, path)``: the fsspec filesystem of a URL (instances are cached by fsspec) and its path there."""
    import fsspec.core

    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def _full(fs, path: str) -> str:
    """A path of ``fs`` as a URL with its protocol again."""
    return fs.unstrip_protocol(path)


def exists(url: str, storage_options: StorageOptions = None) -> bool:
    """Whether a file or directory exists at ``url`` (a missing bucket or host: False)."""
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url, storage_options)
    try:
        return bool(fs.exists(path))
    except (FileNotFoundError, PermissionError):
        return False


def isfile(url: str, storage_options: StorageOptions = None) -> bool:
    """Whether ``url`` is a file (not a directory or prefix)."""
    if is_local(url):
        return os.path.isfile(local_path(url))
    fs, path = filesystem(url, storage_options)
    try:
        return bool(fs.isfile(path))
    except (FileNotFoundError, PermissionError):
        return False


def list_files(url: str, storage_options: StorageOptions = None, recursive: bool = False) -> list[str]:
    """The files in the directory ``url`` (``recursive``: also below it), sorted by full name; ``[url]`` if
    it is a file. Local results are local paths, remote ones URLs with their protocol."""
    if is_local(url):
        path = local_path(url)
        if os.path.isfile(path):
            return [path]
        if recursive:
            return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        return sorted(os.path.join(path, f) for f in os.listdir(path)
                      if os.path.isfile(os.path.join(path, f)))
    fs, path = filesystem(url, storage_options)
    if fs.isfile(path):
        return [url]
    found = fs.find(path, maxdepth=None if recursive else 1, withdirs=False)
    return sorted(_full(fs, p) for p in found)


def glob(url: str, pattern: str, storage_options: StorageOptions = None) -> list[str]:
    """The files directly in the directory ``url`` whose names match the shell ``pattern``, sorted."""
    return [f for f in list_files(url, storage_options) if fnmatch.fnmatchcase(basename(f), pattern)]


def open_input(url: str, storage_options: StorageOptions = None) -> IO[bytes]:
    """A file opened for binary reading (seekable; remote files read by ranges as needed)."""
    if is_local(url):
        return open(local_path(url), "rb")  # noqa: SIM115 - the caller closes it
    fs, path = filesystem(url, storage_options)
    return fs.open(path, "rb")


def read_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    """The whole content of a (small) file."""
    with open_input(url, storage_options) as f:
        return f.read()


def size(url: str, storage_options: StorageOptions = None) -> int:
    """Size of a file in bytes."""
    if is_local(url):
        return os.path.getsize(local_path(url))
    fs, path = filesystem(url, storage_options)
    return int(fs.info(path)["size"])


def fingerprint(url: str, storage_options: StorageOptions = None) -> str:
    """A cheap fingerprint that changes when the file is rewritten, read without reading the file: local
    files ``size-mtime_ns``, remote objects ``size-ETag`` (else ``size-mtime``, else ``size``)."""
    if is_local(url):
        return file_fingerprint(local_path(url))
    fs, path = filesystem(url, storage_options)
    info = fs.info(path)
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") \
        or info.get("mtime") or info.get("updated") or ""
    return f"{info['size']}-{str(tag).strip(chr(34))}" if tag else str(info["size"])


def basename(url: str) -> str:
    """The last component of a path or URL."""
    return os.path.basename(url) if is_local(url) else posixpath.basename(url.rstrip("/"))


def dirname(url: str) -> str:
    """The directory (or prefix) holding a path or URL."""
    return os.path.dirname(url) if is_local(url) else posixpath.dirname(url.rstrip("/"))


def join(url: str, name: str) -> str:
    """``name`` inside the directory ``url``."""
    return os.path.join(url, name) if is_local(url) else url.rstrip("/") + "/" + name
