"""The whole chain (ingest -> reconstruct the new records -> evaluate): one flow, with Prefect (subflow runs on
the ephemeral API) and without (``--no-prefect``); scheduled by ``percival serve --chain``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from datasets.store import open_store
from datasets.store.reconstruction import open_reconstruction
from pipelines import serve as sv
from pipelines.chain import chain_flow


def _chain(*argv: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "chain", *argv, "--no-prefect"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout[r.stdout.index("{"):])


def test_chain_without_prefect_reconstructs_only_the_new_records(tmp_path, samples, tiny_checkpoint):
    inbox, store, out = tmp_path / "inbox", str(tmp_path / "p.zarr"), str(tmp_path / "rec.zarr")
    inbox.mkdir()
    shutil.copy(samples / "physionet2019" / "training_setA_sample.zip", inbox)
    args = ("physionet2019", str(inbox), "--store", store, "--checkpoint", tiny_checkpoint, "--out", out)
    first = _chain(*args)
    assert first["ingest"]["records_stored"] == 200 and first["reconstruct"]["records"] == 200
    shutil.copy(samples / "physionet2019" / "training_setB_sample.zip", inbox)  # the next night's file
    second = _chain(*args, "--evaluation", str(tmp_path / "ev"))
    assert second["ingest"]["records_stored"] == 100 and second["reconstruct"]["records"] == 100
    rec, s = open_reconstruction(out), open_store(store)
    assert list(rec["records"]["record_id"]) == list(s.records["record_id"]) and len(rec["mean"]) == s.n_elements
    assert (tmp_path / "ev" / "evaluation.md").is_file() and second["evaluate"]["protocols"]["holdout"]["n_records"]


def test_chain_flow_runs_its_steps_as_subflows(tmp_path, samples, tiny_checkpoint):
    from prefect_runs import flow_runs_with

    out = str(tmp_path / "rec.zarr")
    summary = chain_flow("physionet2019", str(samples / "physionet2019"), str(tmp_path / "p.zarr"), tiny_checkpoint,
                         out, grid_times=0, folds=0)
    assert summary["reconstruct"]["records"] == summary["ingest"]["records_stored"] == 300
    runs = flow_runs_with("out", out)  # the chain and its reconstruct subflow
    assert len(runs) == 2 and sum(r.parent_task_run_id is not None for r in runs) == 1
    assert all(r.state.is_completed() for r in runs)


def test_serve_schedules_the_chain_reconstruct_and_evaluate(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--chain", f"physionet2019:inbox:p.zarr:{tiny_checkpoint}:rec.zarr",
            "--reconstruct", f"p.zarr:{tiny_checkpoint}:rec2.zarr", "--evaluate", f"p.zarr:{tiny_checkpoint}:ev",
            "--cron", "30 2 * * *", "--dry-run"]
    assert sv.main(argv) == 0
    entries = {e["deployment"]: e["parameters"] for e in json.loads(capsys.readouterr().out)}
    assert set(entries) == {"chain/rec", "reconstruct/rec2", "evaluate/ev"}
    assert entries["chain/rec"]["out"] == str(tmp_path / "rec.zarr") and entries["evaluate/ev"]["out_dir"] == str(
        tmp_path / "ev")
    assert sv.main(["--reconstruct", "p.zarr:no-such-model:r.zarr", "--interval", "60", "--dry-run"]) == 2
    assert "nor a shipped model" in capsys.readouterr().err
