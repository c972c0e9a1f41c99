"""Stores in object storage: Icechunk repositories in a bucket of an S3-compatible server (moto, server mode).

Ingest, reconstruct and evaluate read and write them by URL with the local stores' guarantees; plain xarray
reads them through an Icechunk session. The kill -9 and concurrent-writer checks are in ``test_faults.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr

from datasets.ingest import ingest, read_shard, shard_specs
from datasets.sources import get_source
from datasets.store import StoreConflict, StoreError, StoreWriter, open_store
from datasets.store.reconstruction import open_reconstruction


@pytest.fixture(scope="module")
def bucket_store(s3_server, samples, physionet_sample_store) -> str:
    """The PhysioNet sample ingested into a bucket (read-only for tests)."""
    url = f"s3://{s3_server.new_bucket()}/stores/physionet.zarr"
    ingest("physionet2019", str(samples / "physionet2019"), url)
    return url


def test_a_store_in_a_bucket_equals_the_local_one_and_xarray_reads_it(bucket_store, physionet_sample_store):
    import icechunk

    remote, local = open_store(bucket_store), open_store(physionet_sample_store)
    assert remote.content_hash() == local.content_hash() and remote.n_records == 300
    # the README's recipe: plain xarray over the repository's last snapshot
    bucket, prefix = bucket_store.removeprefix("s3://").split("/", 1)
    repo = icechunk.Repository.open(icechunk.s3_storage(bucket=bucket, prefix=prefix, from_env=True,
                                                        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                                                        allow_http=True,
                                                        force_path_style=True))
    ds = xr.open_zarr(repo.readonly_session("main").store, consolidated=False)
    assert ds.sizes["element"] == local.n_elements
    np.testing.assert_array_equal(ds["value"].values, local.group["value"][:])
    assert remote.to_xarray().sizes["record"] == 300


def test_missing_store_in_a_bucket_is_a_clear_error(s3_server):
    bucket = s3_server.new_bucket()
    with pytest.raises(StoreError, match="no Zarr store here"):
        open_store(f"s3://{bucket}/nothing.zarr")


def test_a_writer_that_lost_a_commit_race_publishes_nothing(s3_server, samples):
    """Two writers opened on the same snapshot: the first commit wins, the second raises StoreConflict and
    leaves the winner's commit as the store's state (no lock exists in a bucket; Icechunk detects the race)."""
    url = f"s3://{s3_server.new_bucket()}/race.zarr"
    source = get_source("physionet2019")
    first = StoreWriter(url, source, "a")  # creates the store (one commit)
    second = StoreWriter(url, source, "b")
    specs = shard_specs(source, "physionet2019", source.discover(str(samples / "physionet2019")), set(), 100, {},
                        100_000)
    first.append(read_shard(specs[0]), specs[0].units)
    with pytest.raises(StoreConflict, match="another writer committed first"):
        second.append(read_shard(specs[1]), specs[1].units)
    after = open_store(url)
    assert after.n_records == 100 and set(after.records["source_file"]) <= {u.name for u in specs[0].units}


def test_reconstruct_and_evaluate_with_stores_in_a_bucket(bucket_store, physionet_sample_store, tiny_checkpoint,
                                                          tmp_path):
    from pipelines.evaluate import evaluate_flow
    from pipelines.reconstruct import reconstruct_flow

    out = bucket_store.replace("physionet.zarr", "reconstruction.zarr")
    kwargs = dict(records_per_shard=100, grid_times=3, folds=0)
    summary = reconstruct_flow(bucket_store, tiny_checkpoint, out, **kwargs)
    assert summary["records"] == 300 and summary["shards"] == 3
    local = str(tmp_path / "reconstruction.zarr")
    reconstruct_flow(physionet_sample_store, tiny_checkpoint, local, **kwargs)
    a, b = open_reconstruction(out), open_reconstruction(local)
    for name in ("mean", "sigma", "grid_mean", "latent"):
        np.testing.assert_array_equal(a[name], b[name])
    assert reconstruct_flow(bucket_store, tiny_checkpoint, out, **kwargs)["records"] == 0  # idempotent re-run
    result = evaluate_flow(bucket_store, tiny_checkpoint, str(tmp_path / "evaluation"), protocols=("holdout",),
                           max_records=40, samples=2)
    assert (tmp_path / "evaluation" / "evaluation.md").exists() and result["markdown"]
