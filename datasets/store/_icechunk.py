"""Stores in object storage (``s3://``, ``gs://``): Icechunk repositories, transactional Zarr v3.

An object store has no atomic rename and no lock, so the local commit protocol (rewrite the root document
last, hold a lock file) cannot promise there what it promises on a disk. Icechunk can: a writer's changes
live in a session until ``commit``, which publishes them as one snapshot with a conditional write of the
branch reference; a killed writer leaves no trace a reader can see, and of two writers that started from
the same snapshot the second one's commit fails with a conflict instead of interleaving with the first.

A store URL ``s3://bucket/prefix`` is the Icechunk repository at that prefix (branch ``main``). Credentials
and endpoint come from ``storage_options`` (s3fs's names: ``key``, ``secret``, ``token``, ``endpoint_url``,
``region``, ``anon``) or from the standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``; ``GOOGLE_APPLICATION_CREDENTIALS`` for gs://).

Reading one with plain xarray::

    import icechunk, xarray as xr
    repo = icechunk.Repository.open(icechunk.s3_storage(bucket="b", prefix="plasticc.zarr", from_env=True))
    ds = xr.open_zarr(repo.readonly_session("main").store, consolidated=False)
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlparse

from datasets.store._zarr import StoreError

BRANCH = "main"
#: seconds a writer waits for a repository that another writer is creating at the same instant
CREATION_WAIT = 30.0
#: URL schemes whose stores are Icechunk repositories
SCHEMES = ("s3", "gs", "gcs")


class StoreConflict(StoreError):
    """Another writer committed to the store after this one started: re-open and try again."""


def is_transactional(url: str) -> bool:
    """Whether the store at ``url`` is an Icechunk repository (an object-store URL)."""
    return urlparse(str(url)).scheme in SCHEMES


def _icechunk():
    try:
        import icechunk
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("stores in object storage need Icechunk: pip install 'percival[s3]'") from e
    return icechunk


def storage(url: str, storage_options: dict | None = None):
    """The Icechunk storage of the object-store URL ``url``."""
    ic = _icechunk()
    opts = dict(storage_options or {})
    parsed = urlparse(url)
    bucket, prefix = parsed.netloc, parsed.path.strip("/") or None
    if not bucket:
        raise ValueError(f"{url}: no bucket in the URL (expected s3://BUCKET/PATH)")
    if parsed.scheme == "s3":
        endpoint = (opts.get("endpoint_url") or opts.get("client_kwargs", {}).get("endpoint_url")
                    or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        region = (opts.get("region") or opts.get("region_name") or opts.get("client_kwargs", {}).get("region_name")
                  or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
        key = opts.get("key") or opts.get("aws_access_key_id")
        secret = opts.get("secret") or opts.get("aws_secret_access_key")
        anon = bool(opts.get("anon", False))
        return ic.s3_storage(bucket=bucket, prefix=prefix, region=region, endpoint_url=endpoint,
                             allow_http=bool(endpoint and endpoint.startswith("http://")),
                             force_path_style=bool(endpoint),  # S3-compatible servers (MinIO, Ceph, moto)
                             access_key_id=key, secret_access_key=secret, session_token=opts.get("token"),
                             anonymous=anon or None, from_env=None if (key or anon) else True)
    return ic.gcs_storage(bucket=bucket, prefix=prefix, service_account_file=opts.get("token")
                          if isinstance(opts.get("token"), str) else None,
                          anonymous=bool(opts.get("anon", False)) or None, from_env=True)


def open_repository(url: str, storage_options: dict | None = None, create: bool = False):
    """The repository at ``url``; None where there is none and ``create`` is false."""
    ic = _icechunk()
    st = storage(url, storage_options)
    try:
        if not create:
            return ic.Repository.open(st) if ic.Repository.exists(st) else None
        try:
            return ic.Repository.open_or_create(st)
        except ic.IcechunkError:
            # another writer is creating it in the same instant ("can only be created in clean prefixes"):
            # its creation lands within moments, then this writer opens it
            deadline = time.monotonic() + CREATION_WAIT
            while time.monotonic() < deadline:
                if ic.Repository.exists(st):
                    return ic.Repository.open(st)
                time.sleep(0.05)
            raise
    except ic.IcechunkError as e:
        raise OSError(f"{url}: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    """Icechunk's errors carry a multi-line span trace: the first line says what happened."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class Transaction:
    """A writable session of the store at ``url``: ``store`` to write through, :meth:`commit` to publish."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.repo = open_repository(url, storage_options, create=True)
        self.session = self.repo.writable_session(BRANCH)

    @property
    def store(self):
        return self.session.store

    def commit(self, message: str) -> str:
        """Publish this session's changes as one snapshot; start the next session from it. Raises
        :class:`StoreConflict` where another writer committed first (nothing of this session is published)."""
        ic = _icechunk()
        if not self.session.has_uncommitted_changes:
            return self.session.snapshot_id
        try:
            snapshot = self.session.commit(message)
        except ic.ConflictError as e:
            raise StoreConflict(f"{self.url}: another writer committed first ({_first_line(e)}); nothing of "
                                "this commit was published, re-run to continue from its commit") from None
        self.session = self.repo.writable_session(BRANCH)
        return snapshot


def readonly_store(url: str, storage_options: dict | None = None):
    """The Zarr store of the last snapshot of ``url``'s main branch; None where there is no repository."""
    repo = open_repository(url, storage_options)
    return None if repo is None else repo.readonly_session(BRANCH).store
