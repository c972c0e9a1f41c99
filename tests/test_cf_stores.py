"""CF-1.11 element and reconstruction stores: plain xarray writes them to netCDF and reads them back equal;
cf_xarray finds the time axis and the record id; stores of format 1.0 still open."""

from __future__ import annotations

import shutil
from pathlib import Path

import cf_xarray  # noqa: F401  (registers the .cf accessor)
import numpy as np
import pytest
import xarray as xr

from datasets.ingest import ingest
from datasets.store import open_store
from pipelines.reconstruct import reconstruct_flow

OLD_STORE = Path(__file__).parent / "data" / "store-format-1.0"  # bundled MACHO samples, written by format 1.0


def netcdf_round_trip(url: str, path: Path) -> tuple[xr.Dataset, xr.Dataset]:
    ds = xr.open_zarr(url)
    ds.to_netcdf(path)
    return ds.load(), xr.open_dataset(path).load()


@pytest.mark.parametrize("source, units", [("physionet2019", "hours"), ("plasticc", "days since 1858-11-17 00:00:00")])
def test_element_store_to_netcdf_round_trips(tmp_path, samples, source, units):
    url = str(tmp_path / "s.zarr")
    ingest(source, str(samples / source), url)
    ds, back = netcdf_round_trip(url, tmp_path / "s.nc")
    assert ds.identical(back)
    assert (ds["time"].attrs.get("units") or ds["time"].encoding["units"]) == units  # decoded: in encoding
    assert ds.cf.axes["T"] == ["time"] and ds.cf.cf_roles["timeseries_id"] == ["record_id"]
    assert ds["row_size"].attrs["sample_dimension"] == "element"
    # no variable is named like a dimension it does not index (the element array is channel_index)
    assert all(ds[d].dims == (d,) for d in ds.dims if d in ds.variables)
    if units != "hours":  # an epoch: decoded to dates; static elements NaT
        assert ds["time"].dtype.kind == "M"
        t = ds["time"].values[np.isfinite(open_store(url).read().time)]
        assert t.min() > np.datetime64("2019-01-01") and t.max() < np.datetime64("2030-01-01")
    # Percival's own reader is untouched by the CF attributes
    store = open_store(url)
    assert store.meta["commit"]["record"] == ds.sizes["record"]
    np.testing.assert_array_equal(store.read().channel, ds["channel_index"].values)


def test_reconstruction_store_to_netcdf_round_trips(tmp_path, physionet_sample_store, tiny_checkpoint):
    out = str(tmp_path / "rec.zarr")
    reconstruct_flow(physionet_sample_store, tiny_checkpoint, out, records_per_shard=300, grid_times=4, samples=2)
    ds, back = netcdf_round_trip(out, tmp_path / "rec.nc")
    assert ds.identical(back)
    assert ds["grid_time"].attrs["units"] == "hours" and ds["samples"].dims == ("element", "sample")


def test_format_1_0_store_still_opens_and_takes_appends(tmp_path, samples):
    url = str(tmp_path / "old.zarr")
    shutil.copytree(OLD_STORE, url)
    old = open_store(url)
    assert "channel" in old.group.array_keys() and "channel_index" not in old.group.array_keys()
    before = old.read()
    assert old.n_records == 2 and old.summary()["elements"] == before.n_elements == 612
    assert set(before.channel) == {0, 1}
    # a new ingest appends to the old layout (the ledger skips what is in; a new file is read)
    extra = tmp_path / "macho"
    extra.mkdir()
    lc = extra / "lc_9.1.1.R.mjd"
    lc.write_text((samples / "macho" / "lc_1.4418.1930.R.mjd").read_text().replace("1.4418.1930", "9.1.1"))
    report = ingest("macho", str(extra), url)
    assert report.records_stored == 1
    after = open_store(url)
    assert after.n_records == 3 and "channel_index" not in after.group.array_keys()
    np.testing.assert_array_equal(after.read(0, 2).channel, before.channel)
