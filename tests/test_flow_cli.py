"""The ingest Prefect flow (real ephemeral API server) and the ``percival`` CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from prefect_runs import flow_run_record, flow_runs_with

from datasets.ingest import ingest
from datasets.store import open_store
from pipelines.cli import main
from pipelines.ingest import ingest_flow


def test_ingest_flow_matches_the_plain_api_and_publishes_a_report(tmp_path, samples):
    src = str(samples / "physionet2019")
    flow_store, api_store = str(tmp_path / "flow.zarr"), str(tmp_path / "api.zarr")
    state = ingest_flow(source="physionet2019", path=src, store=flow_store, shard_size=64, workers=2,
                        return_state=True)
    summary = state.result()
    assert summary["reconciles"] and summary["shards"] == 5 and summary["records_stored"] == 300
    ingest("physionet2019", src, api_store, shard_size=64)
    assert open_store(flow_store).content_hash() == open_store(api_store).content_hash()

    run, names, mine = flow_run_record(state.state_details.flow_run_id)
    assert run.state.is_completed()
    assert names == {"ingest-physionet2019"}  # one coarse task: no per-shard round trips to the API
    assert {a.type for a in mine} >= {"markdown", "table", "progress"}
    md = next(a for a in mine if a.type == "markdown").data
    assert "Read = stored + quarantined for every source file: **True**" in md

    # Re-running the flow on the unchanged archive changes nothing.
    again = ingest_flow(source="physionet2019", path=src, store=flow_store, workers=1)
    assert again["units_skipped"] == 300 and again["shards"] == 0


def test_cli_ingest_and_info(tmp_path, samples, capsys):
    store = str(tmp_path / "plasticc.zarr")
    assert main(["ingest", "plasticc", str(samples / "plasticc"), "--store", store, "--no-prefect"]) == 0
    out = capsys.readouterr().out
    assert "Read = stored + quarantined for every source file: **True**" in out
    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "300 records" in out and "lsst_g" in out and "36.31 nJy" in out
    assert main(["info", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 300 and info["modalities"]["static"] == 600


def test_cli_reports_bad_arguments_clearly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", "nosuch", str(tmp_path), "--store",
                        str(tmp_path / "x.zarr"), "--no-prefect"], capture_output=True, text=True)
    assert r.returncode != 0 and "unknown source 'nosuch'" in r.stderr


def test_cli_ingest_runs_the_flow_on_a_temporary_api_started_first(tmp_path, samples):
    """No PREFECT_API_URL: the command starts its own API server before importing the flow, sends every log
    before stopping it, and leaves no server behind."""
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", "plasticc", str(samples / "plasticc"),
                        "--store", str(tmp_path / "p.zarr")], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["records_stored"] == 300 and summary["reconciles"]
    assert "Error logging to API" not in out and "Traceback" not in out

    # the temporary server wrote to the same Prefect database the test's API reads
    (run,) = flow_runs_with("store", str(tmp_path / "p.zarr"))
    assert run.state.is_completed()


def test_ingest_help_lists_a_sources_options_with_meaning_and_default(capsys):
    from pipelines.cli import main

    assert main(["ingest", "table", "-h"]) == 0
    out = capsys.readouterr().out
    assert "usage: percival ingest" in out and "options of source 'table'" in out
    assert "astropy unit of the time column (e.g. 'd' days, 'h' hours, 'min') (default 'd')" in out
    assert "valid_min" in out and "nonnegative" in out
    assert main(["ingest", "physionet2019", "--help"]) == 0
    assert "source 'physionet2019' takes no options." in capsys.readouterr().out


def test_a_checkpoint_that_does_not_match_the_store_is_one_line_before_any_work(tmp_path, samples, capsys,
                                                                                tiny_checkpoint):
    store = str(tmp_path / "plasticc.zarr")
    ingest("plasticc", str(samples / "plasticc"), store)
    for command in (["evaluate", store, "--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "eval")],
                    ["reconstruct", store, "--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "rec.zarr")]):
        assert main(command) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("percival ")]
        assert len(err) == 1 and "has no channel 'HR', which the model was trained on" in err[0], err
    assert not (tmp_path / "rec.zarr").exists() and not list((tmp_path / "eval").glob("*.png"))


def test_asking_for_another_head_than_the_checkpoints_is_one_line_before_any_work(tmp_path, capsys,
                                                                                 physionet_sample_store,
                                                                                 tiny_checkpoint):
    for command in (["evaluate", physionet_sample_store, "--checkpoint", tiny_checkpoint, "--out",
                     str(tmp_path / "eval"), "--head", "diffusion"],
                    ["reconstruct", physionet_sample_store, "--checkpoint", tiny_checkpoint, "--out",
                     str(tmp_path / "rec.zarr"), "--head", "diffusion"]):
        assert main(command) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("percival ")]
        assert len(err) == 1 and "trained with the 'gaussian' head, not 'diffusion'" in err[0], err
    assert not (tmp_path / "rec.zarr").exists() and not list((tmp_path / "eval").glob("*.png"))


def test_device_choice_is_checked_before_any_work(tmp_path, physionet_sample_store, tiny_checkpoint, capsys):
    """--device on train, reconstruct and evaluate: a GPU asked for where torch sees none (or a name that is no
    device) is one line naming the choice, exit 2, and nothing is written."""
    import torch

    from pipelines.run.devices import resolve_device

    assert resolve_device("cpu").type == "cpu" and resolve_device("CPU").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(ValueError, match="cpu, cuda, cuda:N or auto"):
            resolve_device(bad)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU errors cannot be seen here")
    out = tmp_path / "out"
    for argv in (["train", physionet_sample_store, "--out", str(out), "--steps", "2", "--device", "cuda"],
                 ["reconstruct", physionet_sample_store, "--checkpoint", tiny_checkpoint, "--out", str(out),
                  "--device", "cuda:0"],
                 ["evaluate", physionet_sample_store, "--checkpoint", tiny_checkpoint, "--out", str(out),
                  "--device", "cuda"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "torch sees no CUDA GPU here" in err and "Traceback" not in err, err
    assert not out.exists()


def test_ingest_on_prefects_dask_task_runner_equals_a_local_ingest(tmp_path, samples, physionet_sample_store):
    """--runner dask: every shard a Prefect task on a local Dask cluster of 2 processes, committed in shard
    order by the flow: the store equals the one a plain ingest makes."""
    from datasets.store import open_store
    from pipelines.ingest import ingest_flow

    store = str(tmp_path / "dask.zarr")
    summary = ingest_flow("physionet2019", str(samples / "physionet2019"), store, shard_size=50, workers=2,
                          runner="dask")
    assert summary["reconciles"] and summary["records_stored"] == 300 and summary["shards"] == 6
    assert open_store(store).content_hash() == open_store(physionet_sample_store).content_hash()
    with pytest.raises(ValueError, match="runner must be 'local' or 'dask'"):
        ingest_flow("physionet2019", str(samples / "physionet2019"), store, runner="ray")


def test_version_and_one_line_errors_with_the_traceback_behind_debug(tmp_path, capsys):
    from datasets.store import StoreError

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("percival ")
    not_a_store = tmp_path / "notes.txt"
    not_a_store.write_text("hello")
    for path in (tmp_path / "missing.zarr", not_a_store):
        assert main(["info", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"percival info: error: {path}: no Zarr store here (no zarr.json)"
    with pytest.raises(StoreError):
        main(["--debug", "info", str(tmp_path / "missing.zarr")])


def test_wrong_invocations_are_one_line_without_traceback(tmp_path, samples, physionet_sample_store,
                                                          tiny_checkpoint):
    """The issue's wrong invocations, as a user types them: one short line on stderr naming the problem, a
    non-zero exit, no traceback (and no Prefect API server started for nothing)."""
    store, missing = physionet_sample_store, str(tmp_path / "missing")
    not_a_store = tmp_path / "notes.txt"
    not_a_store.write_text("hello")
    out = str(tmp_path / "out")
    cases = {
        ("info", missing): "no Zarr store here",
        ("info", str(not_a_store)): "no Zarr store here",
        ("ingest", "nosuch", str(samples / "macho"), "--store", out): "unknown source 'nosuch'",
        ("ingest", "macho", missing, "--store", out): "no such file or directory",
        ("train", missing, "--out", out): "no Zarr store here",
        ("reconstruct", store, "--checkpoint", missing, "--out", out): "nor a shipped model",
        ("evaluate", store, "--checkpoint", str(tmp_path), "--out", out): "not a checkpoint (no config.json)",
        ("evaluate", store, "--checkpoint", tiny_checkpoint, "--out", out, "--protocol", "bogus"):
            "unknown protocol 'bogus'",
    }
    for argv, says in cases.items():
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], (argv, r.stderr)
        assert lines[0].startswith(f"percival {argv[0]}: error: ") and "Traceback" not in r.stdout + r.stderr


def test_every_option_has_help_and_its_default_shown():
    from pipelines.cli import build_parser

    parser, parsers = build_parser()
    parsers["percival"] = parser
    assert {"ingest", "info", "train", "reconstruct", "evaluate", "models", "demo", "serve"} <= set(parsers)
    for name, parser in parsers.items():
        for action in parser._actions:
            assert action.help, f"percival {name}: {action.dest} has no help"
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in parser._get_formatter()._get_help_string(action), (name, action.dest)
        assert parser.format_help().startswith("usage: percival")
