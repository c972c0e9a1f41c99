"""``percival serve``: run Percival's flows on schedules against a Prefect server.

Each schedule entry becomes a Prefect deployment (``flow.to_deployment``) and this process serves them
(``prefect.serve``): it polls the server for scheduled runs and executes each in a subprocess. The server's
scheduler creates the runs, so a real server is needed (``prefect server start``; the ephemeral API that
plain ``percival ingest`` starts cannot schedule). See ``docs/schedules.md``.

Entries come from the command line (``--ingest SOURCE:PATH:STORE``, repeatable) or a TOML/JSON schedule
file (``--file``). The flows that can be scheduled are listed in :data:`SCHEDULABLE`; adding one is one
entry there (its CLI option, file table, parameter checks and deployment follow from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import signal
import sys
import threading
import zoneinfo
from pathlib import Path
from typing import Any

from pipelines.options import OptionError, parse_pairs


@dataclasses.dataclass(frozen=True)
class Schedulable:
    """A flow that ``percival serve`` can schedule.

    ``flow``: ``"module:attribute"`` of the Prefect flow (imported only when used; the deployment's
    entrypoint is its module path, so runs import the installed package from any directory).
    ``fields``: the flow parameters given positionally on the command line, ``A:B:C`` in this order.
    ``paths``: parameters that are local paths (made absolute: runs do not share the caller's directory).
    ``name_from``: the parameter whose file stem names the deployment by default (e.g. ``physionet``).
    ``check``: optional ``"module:function"`` called with the parameters when the entry is made; it raises
    ``ValueError`` (or ``TypeError``) for values the flow would refuse, so mistakes show before the first run.
    """

    flow: str
    fields: tuple[str, ...]
    paths: tuple[str, ...] = ()
    name_from: str | None = None
    help: str = ""
    check: str | None = None

    def load(self):
        return _import(self.flow)


def _import(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def check_ingest(params: dict) -> None:
    """The source exists and takes the options; warns if a local archive path does not exist (yet)."""
    from datasets.sources import get_source

    get_source(params["source"], **(params.get("options") or {}))
    path = params["path"]
    if "://" not in path and not os.path.exists(path):
        print(f"percival serve: warning: {path} does not exist (yet); runs fail until it does", file=sys.stderr)


def check_model(params: dict) -> None:
    """The checkpoint is a checkpoint directory (made absolute) or a shipped model's name (its directory)."""
    from perceiver.pretrained import resolve_checkpoint

    try:
        params["checkpoint"] = str(Path(resolve_checkpoint(params["checkpoint"])).absolute())
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None


def check_evaluate(params: dict) -> None:
    """The model, and the protocols (known kinds)."""
    from pipelines.run.protocols import Protocol

    check_model(params)
    for spec in params.get("protocols") or ():
        Protocol.parse(spec)


def check_chain(params: dict) -> None:
    check_ingest(params)
    check_evaluate(params)


#: The schedulable flows by name: the name is the ``--NAME`` option and the ``[[NAME]]`` table of a file.
SCHEDULABLE: dict[str, Schedulable] = {
    "ingest": Schedulable("pipelines.ingest:ingest_flow", ("source", "path", "store"), paths=("path", "store"),
                          name_from="store", help="ingest the files of PATH that STORE lacks",
                          check="pipelines.serve:check_ingest"),
    "reconstruct": Schedulable("pipelines.reconstruct:reconstruct_flow", ("store", "checkpoint", "out"),
                               paths=("store", "out"), name_from="out",
                               help="reconstruct the records of STORE that OUT lacks, with CHECKPOINT (a "
                                    "directory or a shipped model's name)",
                               check="pipelines.serve:check_model"),
    "evaluate": Schedulable("pipelines.evaluate:evaluate_flow", ("store", "checkpoint", "out_dir"),
                            paths=("store", "out_dir"), name_from="out_dir",
                            help="evaluate CHECKPOINT on STORE into the folder OUT_DIR",
                            check="pipelines.serve:check_evaluate"),
    "chain": Schedulable("pipelines.chain:chain_flow", ("source", "path", "store", "checkpoint", "out"),
                         paths=("path", "store", "out", "evaluation"), name_from="out",
                         help="ingest the files of PATH that STORE lacks, then reconstruct the records OUT lacks "
                              "with CHECKPOINT (and evaluate into the folder of the parameter evaluation, "
                              "where given)",
                         check="pipelines.serve:check_chain"),
}

#: ``--overlap``: what the server does with a run that is due while the previous run of the same deployment
#: is still going (deployment concurrency limit 1 and its collision strategy), or ``allow``: no limit.
OVERLAP = {"skip": "CANCEL_NEW", "queue": "ENQUEUE", "allow": None}
SCHEDULE_KEYS = ("interval", "cron", "timezone")


class ServeError(ValueError):
    """A schedule entry or the server set-up is wrong; the message says what to change."""


@dataclasses.dataclass
class Entry:
    """One schedule: a flow, its deployment name, its parameters, its interval (seconds) or cron."""

    flow: str
    name: str
    parameters: dict[str, Any]
    interval: float | None = None
    cron: str | None = None
    timezone: str | None = None

    @property
    def deployment(self) -> str:
        return f"{self.flow}/{self.name}"

    def schedule(self):
        from prefect.schedules import Cron, Interval

        if self.cron is not None:
            return Cron(self.cron, timezone=self.timezone)
        return Interval(self.interval, timezone=self.timezone)

    def describe(self) -> dict:
        when = {"cron": self.cron} if self.cron is not None else {"interval_seconds": self.interval}
        return {"deployment": self.deployment, **when, "timezone": self.timezone, "parameters": self.parameters}


# ----------------------------------------------------------------------------------------------- entries

def split_spec(spec: str) -> list[str]:
    """Split ``A:B:C`` on colons, keeping URL schemes whole: ``x:/in:s3://b/o.zarr`` → 3 fields."""
    out: list[str] = []
    for part in spec.split(":"):
        if out and part.startswith("//") and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", out[-1]):
            out[-1] += ":" + part
        else:
            out.append(part)
    return out


def _absolute(value: Any) -> Any:
    if not isinstance(value, str) or "://" in value:
        return value
    return str(Path(value).expanduser().absolute())


def _default_name(flow: str, params: dict) -> str:
    spec = SCHEDULABLE[flow]
    value = params.get(spec.name_from or spec.fields[-1], flow)
    stem = Path(str(value).rstrip("/")).name.split(".")[0] or flow
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or flow


def check_parameters(flow: str, params: dict, where: str) -> dict:
    """``params`` with paths made absolute; raises :class:`ServeError` on unknown or missing parameters."""
    spec = SCHEDULABLE[flow]
    sig = inspect.signature(spec.load().fn)
    unknown = sorted(set(params) - set(sig.parameters))
    if unknown:
        raise ServeError(f"{where}: {flow} has no parameter {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(sig.parameters)}")
    missing = [n for n, p in sig.parameters.items() if p.default is inspect.Parameter.empty and n not in params]
    if missing:
        raise ServeError(f"{where}: {flow} needs {', '.join(map(repr, missing))}")
    params = {k: (_absolute(v) if k in spec.paths else v) for k, v in params.items()}
    if spec.check:
        try:
            _import(spec.check)(params)
        except (ValueError, TypeError) as exc:
            raise ServeError(f"{where}: {exc}") from None
    return params


def make_entry(flow: str, params: dict, schedule: dict, where: str, name: str | None = None) -> Entry:
    params = check_parameters(flow, params, where)
    interval, cron = schedule.get("interval"), schedule.get("cron")
    if (interval is None) == (cron is None):
        raise ServeError(f"{where}: give exactly one of interval (seconds) or cron"
                         + (f" (got interval={interval!r} and cron={cron!r})" if interval is not None else ""))
    if interval is not None:
        try:
            interval = float(interval)
        except (TypeError, ValueError):
            raise ServeError(f"{where}: interval must be a number of seconds, got {interval!r}") from None
        if not interval > 0:
            raise ServeError(f"{where}: interval must be > 0 seconds, got {interval!r}")
    entry = Entry(flow, name or _default_name(flow, params), params, interval, cron, schedule.get("timezone"))
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", entry.name):
        raise ServeError(f"{where}: deployment name {entry.name!r} may use letters, digits, '_', '.', '-' only")
    try:
        entry.schedule()  # validates cron strings now, not at the first run
        if entry.timezone:
            zoneinfo.ZoneInfo(entry.timezone)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError) as exc:
        raise ServeError(f"{where}: bad schedule: {exc!r}") from None
    return entry


def entries_from_args(flow: str, specs: list[str], schedule: dict, extra: dict) -> list[Entry]:
    fields = SCHEDULABLE[flow].fields
    out = []
    for spec in specs:
        name, eq, rest = spec.partition("=")
        if not eq or ":" in name:  # no NAME= prefix
            name, rest = None, spec
        values = split_spec(rest)
        if len(values) != len(fields) or not all(values):
            raise ServeError(f"--{flow} {spec!r}: expected [NAME=]{':'.join(f.upper() for f in fields)}")
        out.append(make_entry(flow, {**extra, **dict(zip(fields, values, strict=True))}, schedule,
                              f"--{flow} {spec}", name))
    return out


def load_file(path: str, cli_schedule: dict) -> list[Entry]:
    """Entries of a TOML (or ``.json``) schedule file; see ``docs/schedules.md`` for the format."""
    import tomllib

    try:
        with open(path, "rb") as f:
            doc = json.load(f) if path.endswith(".json") else tomllib.load(f)
    except (OSError, ValueError) as exc:
        raise ServeError(f"{path}: {exc}") from None
    unknown = sorted(k for k in doc if k not in SCHEDULE_KEYS and k not in SCHEDULABLE)
    if unknown:
        raise ServeError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; top-level keys are "
                         f"{', '.join(SCHEDULE_KEYS)} and tables [[{']], [['.join(SCHEDULABLE)}]]")
    defaults = {k: doc[k] for k in SCHEDULE_KEYS if k in doc}
    out = []
    for flow in SCHEDULABLE:
        tables = doc.get(flow, [])
        if isinstance(tables, dict):
            tables = [tables]
        for i, table in enumerate(tables):
            where = f"{path} [[{flow}]] #{i + 1}"
            if not isinstance(table, dict):
                raise ServeError(f"{where}: expected a table")
            table = dict(table)
            name = table.pop("name", None)
            own = {k: table.pop(k) for k in SCHEDULE_KEYS if k in table}
            schedule = _merge_schedules(own, cli_schedule, defaults)
            out.append(make_entry(flow, table, schedule, where, name))
    return out


def _merge_schedules(*levels: dict) -> dict:
    """The first level that names interval or cron decides both; time zone: the first given."""
    when = next((lv for lv in levels if lv.get("interval") is not None or lv.get("cron") is not None), {})
    tz = next((lv["timezone"] for lv in levels if lv.get("timezone")), None)
    return {"interval": when.get("interval"), "cron": when.get("cron"), "timezone": tz}


def _params(pairs: list[str] | None) -> dict:
    try:
        return parse_pairs(pairs, "--param")
    except OptionError as e:
        raise ServeError(str(e)) from None


def collect(args: argparse.Namespace) -> list[Entry]:
    """All entries of the command line and the schedule file; names unique per flow."""
    schedule = {"interval": args.interval, "cron": args.cron, "timezone": args.timezone}
    entries: list[Entry] = []
    extra = _params(args.param)
    for flow in SCHEDULABLE:
        entries += entries_from_args(flow, getattr(args, f"sched_{flow}") or [], schedule, extra)
    if args.file:
        entries += load_file(args.file, schedule)
    if not entries:
        raise ServeError("nothing to serve: give " + " or ".join(f"--{f}" for f in SCHEDULABLE) + " or --file")
    seen: dict[str, int] = {}
    for e in entries:  # two stores with the same stem: physionet, physionet-2
        n = seen[e.deployment] = seen.get(e.deployment, 0) + 1
        if n > 1:
            e.name = f"{e.name}-{n}"
    if len({e.deployment for e in entries}) != len(entries):
        raise ServeError("deployment names collide: " + ", ".join(e.deployment for e in entries))
    return entries


# ----------------------------------------------------------------------------------------------- serving

def deployments(entries: list[Entry], overlap: str = "skip") -> list:
    """One Prefect ``RunnerDeployment`` per entry (nothing is sent to the server yet)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    strategy = OVERLAP[overlap]
    limit = None if strategy is None else ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy(strategy))
    out = []
    for e in entries:
        flow = SCHEDULABLE[e.flow].load()
        out.append(flow.to_deployment(
            name=e.name, schedules=[e.schedule()], parameters=e.parameters, concurrency_limit=limit,
            tags=["percival", e.flow], description=f"percival serve: {e.flow} {json.dumps(e.parameters)}",
            entrypoint_type=EntrypointType.MODULE_PATH))
    return out


def api_url() -> str:
    """The Prefect server's API URL, checked: set (not the ephemeral API) and answering ``/health``."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ServeError("PREFECT_API_URL is not set: schedules need a running Prefect server (the ephemeral "
                         "API cannot schedule). Start one with `prefect server start --host 127.0.0.1` and "
                         "`export PREFECT_API_URL=http://127.0.0.1:4200/api`.")
    try:
        r = httpx.get(url.rstrip("/") + "/health", timeout=10)
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise ServeError(f"the Prefect server at PREFECT_API_URL={url} does not answer ({exc}); "
                         "is `prefect server start` running?") from None
    return url


def serve(entries: list[Entry], *, overlap: str = "skip", limit: int | None = None, run_now: bool = False,
          pause_on_shutdown: bool = True) -> None:
    """Register the deployments and serve them until interrupted (Ctrl-C or SIGTERM)."""
    import prefect

    url = api_url()
    deps = deployments(entries, overlap)
    print(f"percival serve: {len(deps)} deployment(s) on {url}", file=sys.stderr)
    for e in entries:
        print("  " + json.dumps(e.describe()), file=sys.stderr)
    if run_now:
        from prefect.deployments import run_deployment

        for d in deps:
            run = run_deployment(d.apply(), timeout=0, tags=["percival", "run-now"])
            print(f"  {d.flow_name}/{d.name}: run {run.name} now", file=sys.stderr)
    if threading.current_thread() is threading.main_thread():
        # A shell starts background jobs with SIGINT ignored; restore it so that `kill -INT` (like Ctrl-C)
        # stops serving cleanly: Prefect pauses the schedules on KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    prefect.serve(*deps, limit=limit, pause_on_shutdown=pause_on_shutdown)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        for opt in ("limit",):
            if getattr(args, opt) is not None and getattr(args, opt) < 1:
                raise ServeError(f"--{opt.replace('_', '-')} must be >= 1")
        entries = collect(args)
        if args.dry_run:
            print(json.dumps([e.describe() for e in entries], indent=1))
            return 0
        serve(entries, overlap=args.overlap, limit=args.limit, run_now=args.run_now,
              pause_on_shutdown=not args.keep_schedules)
    except ServeError as exc:
        print(f"percival serve: {exc}", file=sys.stderr)
        return 2
    return 0


def add_serve_parser(subparsers, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to ``percival``'s subparsers."""
    p = subparsers.add_parser(
        "serve", help="run flows on schedules against a Prefect server (PREFECT_API_URL)",
        formatter_class=formatter_class,
        description="Serve Percival's flows as scheduled Prefect deployments. Needs a running Prefect server: "
                    "`prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api. "
                    "See docs/schedules.md.")
    for flow, spec in SCHEDULABLE.items():
        p.add_argument(f"--{flow}", dest=f"sched_{flow}", action="append",
                       metavar="[NAME=]" + ":".join(f.upper() for f in spec.fields),
                       help=f"schedule {flow}: {spec.help}; the deployment is {flow}/NAME (default: the "
                            f"{(spec.name_from or spec.fields[-1]).upper()} file name's stem); repeatable")
    p.add_argument("--file", help="TOML (or .json) schedule file: [[" + "]], [[".join(SCHEDULABLE) + "]] tables")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--interval", type=float, metavar="SECONDS", help="seconds between runs (e.g. 86400 for daily)")
    when.add_argument("--cron", metavar="EXPR", help="cron expression, e.g. '30 2 * * *' (02:30 daily)")
    p.add_argument("--timezone", metavar="TZ", help="IANA time zone for --cron, e.g. Europe/Berlin (default UTC)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="extra flow parameter for the command-line entries (JSON values), e.g. shard_size=1000")
    p.add_argument("--overlap", choices=list(OVERLAP), default="skip",
                   help="a run due while the deployment's previous run still goes: skip it (cancelled), "
                        "queue it, or allow both at once")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="most flow runs this process executes at once")
    p.add_argument("--run-now", action="store_true", help="also start one run of every deployment right away")
    p.add_argument("--keep-schedules", action="store_true",
                   help="leave the schedules active on shutdown (default: Prefect pauses them)")
    p.add_argument("--dry-run", action="store_true", help="print the deployments as JSON and exit")
    p.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.serve ...`` = ``percival serve ...``."""
    parser = argparse.ArgumentParser(prog="percival")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
