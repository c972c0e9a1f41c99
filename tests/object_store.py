"""An S3-compatible server for tests: moto's server mode, a real HTTP endpoint (no client mocks).

``s3_server`` (session fixture in ``conftest.py``) starts one on a free local port and points the standard
environment at it (``AWS_ENDPOINT_URL``, test credentials), so code under test authenticates exactly as a
user's would. ``new_bucket`` makes a fresh bucket per test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class S3Server:
    endpoint: str

    def new_bucket(self, prefix: str = "percival") -> str:
        """A new empty bucket; its name (valid S3 name: lower case, 3-63 characters)."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name

    def upload(self, local_dir: str, bucket: str, prefix: str) -> str:
        """Copy the files under ``local_dir`` to ``s3://bucket/prefix/``; returns that URL."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        for root, _, files in os.walk(local_dir):
            for f in files:
                path = os.path.join(root, f)
                key = f"{prefix}/{os.path.relpath(path, local_dir)}"
                client.upload_file(path, bucket, key)
        return f"s3://{bucket}/{prefix}"


ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_REGION": "us-east-1"}


def start_server():
    """Start moto's threaded server on a free port; returns (server, endpoint)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def running_server() -> Iterator[S3Server]:
    """A server for the block, with the standard AWS_* environment pointing at it (restored afterwards)."""
    server, endpoint = start_server()
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield S3Server(endpoint)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
