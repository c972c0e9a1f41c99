"""``percival serve``: schedule entries (fast), and scheduled ingest runs against a real Prefect server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from pipelines import serve as sv

ROOT = Path(__file__).resolve().parents[1]
PHYSIONET = ROOT / "datasets" / "samples" / "physionet2019"


def _args(argv: list[str]):
    import argparse

    p = argparse.ArgumentParser()
    sv.add_serve_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["serve", *argv])


# ----------------------------------------------------------------------------------------------- entries

def test_split_spec_keeps_url_schemes_whole():
    assert sv.split_spec("physionet2019:/data/in:out.zarr") == ["physionet2019", "/data/in", "out.zarr"]
    assert sv.split_spec("plasticc:s3://bucket/in:gs://b/o.zarr") == ["plasticc", "s3://bucket/in", "gs://b/o.zarr"]
    assert sv.split_spec("a:b") == ["a", "b"]


def test_cli_entries_make_absolute_paths_and_unique_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--ingest", f"physionet2019:{PHYSIONET}:stores/physionet.zarr",
            "--ingest", "physionet2019:inbox:other/physionet.zarr", "--ingest", "plasticc:in:s3://b/pl.zarr",
            "--ingest", "nightly=plasticc:in:pl.zarr",
            "--interval", "86400", "--param", "shard_size=64", "--dry-run"]
    assert sv.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [d["deployment"] for d in out] == ["ingest/physionet", "ingest/physionet-2", "ingest/pl", "ingest/nightly"]
    assert out[0]["interval_seconds"] == 86400 and "cron" not in out[0]
    assert out[0]["parameters"] == {"source": "physionet2019", "path": str(PHYSIONET),
                                    "store": str(tmp_path / "stores" / "physionet.zarr"), "shard_size": 64}
    assert out[1]["parameters"]["path"] == str(tmp_path / "inbox")
    assert out[2]["parameters"]["store"] == "s3://b/pl.zarr"  # URLs are left alone


def test_schedule_file(tmp_path):
    f = tmp_path / "schedules.toml"
    f.write_text(f"""
interval = 3600
timezone = "Europe/Berlin"

[[ingest]]
name = "physionet-nightly"
source = "physionet2019"
path = "{PHYSIONET}"
store = "{tmp_path / 'p.zarr'}"
cron = "30 2 * * *"
shard_size = 1000

[[ingest]]
source = "plasticc"
path = "{tmp_path}"
store = "{tmp_path / 'plasticc.zarr'}"
""")
    entries = sv.collect(_args(["--file", str(f)]))
    a, b = entries
    assert (a.deployment, a.cron, a.interval, a.timezone) == ("ingest/physionet-nightly", "30 2 * * *", None,
                                                              "Europe/Berlin")
    assert a.parameters["shard_size"] == 1000
    assert (b.deployment, b.cron, b.interval) == ("ingest/plasticc", None, 3600.0)
    # The command line's schedule overrides the file's top level, not an entry's own.
    a, b = sv.collect(_args(["--file", str(f), "--cron", "0 * * * *"]))
    assert a.cron == "30 2 * * *" and b.cron == "0 * * * *" and b.interval is None

    # Prefect deployments, built offline: schedule, parameters, entrypoint, overlap policy.
    deps = sv.deployments(entries, overlap="skip")
    assert deps[0].name == "physionet-nightly" and deps[0].entrypoint == "pipelines.ingest.ingest_flow"
    assert deps[0].schedules[0].schedule.cron == "30 2 * * *"
    assert deps[0].schedules[0].schedule.timezone == "Europe/Berlin"
    assert deps[1].schedules[0].schedule.interval.total_seconds() == 3600
    assert deps[0].parameters["store"] == str(tmp_path / "p.zarr")
    assert deps[0].concurrency_limit == 1
    assert deps[0].concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert sv.deployments(entries, overlap="allow")[0].concurrency_limit is None


@pytest.mark.parametrize("argv, message", [
    (["--ingest", "physionet2019:x"], "expected [NAME=]SOURCE:PATH:STORE"),
    (["--ingest", "bad name=physionet2019:x:y.zarr", "--interval", "5"], "may use letters, digits"),
    (["--ingest", "nosuch:x:y.zarr", "--interval", "5"], "unknown source 'nosuch'"),
    (["--ingest", "physionet2019:x:y.zarr"], "give exactly one of interval (seconds) or cron"),
    (["--ingest", "physionet2019:x:y.zarr", "--interval", "0"], "interval must be > 0"),
    (["--ingest", "physionet2019:x:y.zarr", "--cron", "99 * * *"], "bad schedule"),
    (["--ingest", "physionet2019:x:y.zarr", "--cron", "0 2 * * *", "--timezone", "Mars/Olympus"], "bad schedule"),
    (["--ingest", "physionet2019:x:y.zarr", "--interval", "5", "--param", "colour=red"],
     "ingest has no parameter 'colour'"),
    ([], "nothing to serve"),
])
def test_bad_entries_are_refused_before_serving(argv, message, capsys):
    assert sv.main([*argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_bad_schedule_files_are_refused(tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text('[[ingest]]\nsource = "physionet2019"\npath = "x"\ninterval = 5\n')
    assert sv.main(["--file", str(f), "--dry-run"]) == 2
    assert "ingest needs 'store'" in capsys.readouterr().err
    f.write_text('intervall = 5\n')
    assert sv.main(["--file", str(f), "--dry-run"]) == 2
    assert "unknown key(s) 'intervall'" in capsys.readouterr().err
    f.write_text('[[ingest]]\nsource = "physionet2019"\npath = "x"\nstore = "y"\ninterval = 5\ncron = "* * * * *"\n')
    assert sv.main(["--file", str(f), "--dry-run"]) == 2
    assert "exactly one of interval" in capsys.readouterr().err


def test_serving_needs_a_server(capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert sv.main(["--ingest", f"physionet2019:{PHYSIONET}:x.zarr", "--interval", "5"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


def test_every_schedulable_flow_takes_its_fields():
    for name, spec in sv.SCHEDULABLE.items():
        params = sv.inspect.signature(spec.load().fn).parameters
        assert set(spec.fields) | set(spec.paths) | {spec.name_from or spec.fields[-1]} <= set(params), name


# ----------------------------------------------------------------------------------------------- end to end

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None, first=signal.SIGTERM) -> None:
    """Ask, then kill the whole process group (flow-run subprocesses included)."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(first)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is ours: start_new_session=True
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _records(store: Path):
    from datasets.store import StoreError, open_store

    try:
        return open_store(str(store)).records
    except (StoreError, FileNotFoundError, OSError, KeyError, ValueError):
        return None


def _flow_runs(api: str, deployment: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def query():
        async with get_client() as client:
            dep = await client.read_deployment_by_name(deployment)
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            return dep, runs

    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(query())


def _wait(what: str, condition, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value is not None and value is not False:
            return value
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n"
                + "\n".join(f"--- {p.name}\n{_tail(p)}" for p in logs))


@pytest.mark.slow
def test_scheduled_ingest_picks_up_new_files(tmp_path):
    t_start = time.monotonic()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "training_setA_sample.zip").write_bytes((PHYSIONET / "training_setA_sample.zip").read_bytes())
    store = tmp_path / "physionet.zarr"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=api)
    server_env = {**base, "PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_UI_ENABLED": "false"}
    serve_env = {**base, "PREFECT_HOME": str(tmp_path / "serve-home"), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                 "PREFECT_LOGGING_LEVEL": "INFO"}
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    logs = [server_log, serve_log]
    server = served = None
    try:
        with open(server_log, "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                 "--no-ui"], env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy():
            assert server.poll() is None, f"prefect server exited ({server.returncode}):\n{_tail(server_log)}"
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait("the Prefect server's /health", healthy, 90, logs)
        t_server = time.monotonic() - t_start

        with open(serve_log, "wb") as log:
            served = subprocess.Popen(
                [sys.executable, "-m", "pipelines.serve", "--ingest", "physionet2019:inbox:physionet.zarr",
                 "--interval", "5", "--run-now"],
                cwd=tmp_path, env=serve_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def ingested(n):
            def check():
                assert served.poll() is None, f"percival serve exited ({served.returncode}):\n{_tail(serve_log)}"
                r = _records(store)
                return r if r is not None and len(r) >= n else None
            return check

        first = _wait("the first scheduled ingest (200 stays)", ingested(200), 60, logs)
        assert len(first) == 200

        # A new file arrives in the watched folder (moved in whole, as a nightly drop should be).
        with zipfile.ZipFile(PHYSIONET / "training_setB_sample.zip") as src:
            members = [m for m in src.namelist() if m.endswith(".psv")][:5]
            part = tmp_path / "new_stays.zip.part"
            with zipfile.ZipFile(part, "w") as dst:
                for m in members:
                    dst.writestr(m, src.read(m))
        os.replace(part, inbox / "new_stays.zip")
        new_ids = {Path(m).stem for m in members}

        second = _wait("a later run to ingest the new file", ingested(205), 60, logs)
        assert len(second) == 205 and new_ids <= set(second.record_id)
        assert set(second[second.record_id.isin(new_ids)].source_file.str.split(":").str[0]) == {"new_stays.zip"}

        def completed_runs():  # the store holds the records before the run finishes (statistics, report)
            dep, runs = _flow_runs(api, "ingest/physionet")
            done = [r for r in runs if r.state and r.state.is_completed()]
            return (dep, runs, done) if len(done) >= 2 else None

        dep, runs, completed = _wait("2 completed flow runs of ingest/physionet", completed_runs, 30, logs)
        assert dep.parameters["path"] == str(inbox) and dep.parameters["store"] == str(store)
        assert dep.schedules[0].schedule.interval.total_seconds() == 5
        assert not any(r.state.is_failed() or r.state.is_crashed() for r in runs if r.state)

        from datasets.store import open_store

        s = open_store(str(store))
        assert s.quarantine.empty and len(s.records) == 205
        print(f"\nserver up in {t_server:.1f} s; {len(completed)} completed runs, "
              f"{sum(1 for r in runs if r.state and r.state.is_cancelled())} skipped (overlap); "
              f"total {time.monotonic() - t_start:.1f} s")
    finally:
        _stop(served, signal.SIGINT)  # SIGINT: Prefect pauses the schedules and exits cleanly
        _stop(server)
