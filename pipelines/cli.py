"""The ``percival`` command line: ``percival ingest | info | train | reconstruct | evaluate | models | demo | serve``.
Run ``percival -h``, or ``percival COMMAND -h``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from pipelines import prefect_env
from pipelines.options import OptionError, parse_pairs
from pipelines.serve import add_serve_parser


def _options(pairs: list[str], flag: str = "--option") -> dict:
    try:
        return parse_pairs(pairs, flag)
    except OptionError as e:
        raise SystemExit(str(e)) from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a count of draws)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of draws, got {value}")
    return value


def cmd_ingest(args: argparse.Namespace) -> int:
    kwargs = dict(shard_size=args.shard_size, options=_options(args.option),
                  max_record_elements=args.max_record_elements)
    if args.input_storage_options:
        kwargs["input_storage_options"] = _options(args.input_storage_options, "--storage-option")
    if args.no_prefect:
        from datasets.ingest import ingest
        from pipelines.ingest import ShardProgress

        with ShardProgress(f"ingest {args.source}") as count:
            report = ingest(args.source, args.path, args.store, workers=args.workers, **kwargs, progress=count)
        print(report.to_markdown())
        summary = report.summary()
    else:
        from pipelines.ingest import ingest_flow

        with prefect_env.api():
            summary = ingest_flow(args.source, args.path, args.store, workers=args.workers, runner=args.runner,
                                  dask_address=args.dask_address, **kwargs)
        print(json.dumps(summary, indent=1))
    return 0 if summary["reconciles"] else 1


def cmd_models(args: argparse.Namespace) -> int:
    from perceiver.pretrained import model_card, shipped_models

    models = shipped_models()
    if args.json:
        print(json.dumps({name: model_card(name) | {"path": str(path)} for name, path in models.items()}, indent=1))
        return 0
    for name, path in models.items():
        card = model_card(name)
        print(f"{name}: {card['summary']}")
        print(f"  trained on: {card['training_data']}")
        for line in card.get("quality", []):
            print(f"  {line}")
        print(f"  data licence: {card['data_licence']}; credit: {card['attribution']}")
        print(f"  made by:  {card['command']} (commit {card['commit'][:12]})")
        print(f"  path:     {path}\n")
    return 0


def reconstruction_summary(url: str) -> dict | None:
    """What ``percival info`` says of a reconstruction store: its input, model, records; None for another store."""
    from datasets.store.reconstruction import committed_meta

    meta = committed_meta(url)
    if not meta:
        return None
    records = meta.get("input_records_done", meta.get("commit", {}).get("record", 0))
    return {"store": url, "reconstructions_of": meta.get("input_store"), "checkpoint": meta.get("checkpoint"),
            "checkpoint_sha256": meta.get("checkpoint_sha256"), "records": int(records),
            "folds": meta.get("folds"), "samples": meta.get("samples"), "updated": meta.get("updated")}


def cmd_info(args: argparse.Namespace) -> int:
    from datasets.store import open_store

    rec = reconstruction_summary(args.store)
    if rec is not None:
        print(json.dumps(rec, indent=1) if args.json else
              f"{rec['store']}: reconstructions of {rec['reconstructions_of']}, {rec['records']:,} records, "
              f"checkpoint {rec['checkpoint']} (sha256 {str(rec['checkpoint_sha256'])[:12]}), "
              f"folds {rec['folds']}, samples {rec['samples']}")
        return 0
    s = open_store(args.store).summary()
    if args.json:
        print(json.dumps(s, indent=1, default=str))
        return 0
    print(f"{s['store']}: source {s['source']}, {s['records']:,} records, {s['elements']:,} elements "
          f"(time in {s['time_unit']}), splits {s['splits']}")
    print("modalities: " + ", ".join(f"{m} {n:,}" for m, n in s["modalities"].items()))
    print(f"{'channel':<20} {'modality':<12} {'unit':<30} {'elements':>12}")
    for c in s["channels"]:
        print(f"{c['name']:<20} {c['modality']:<12} {c['unit']:<30} {c['elements']:>12,}")
    print(f"quarantine: {s['quarantine_rows']:,} rows, {s['quarantined_elements']:,} elements")
    for reason, n in s["quarantine_reasons"].items():
        print(f"  {reason}: {n['rows']:,} rows, {n['elements']:,} elements")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    kwargs = dict(preset=args.preset, steps=args.steps, overrides=args.set, config_path=args.config,
                  nproc=args.nproc, resume=not args.no_resume, head=args.head, device=args.device,
                  nnodes=args.nnodes, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
                  rdzv_id=args.rdzv_id)
    if args.no_prefect:
        import logging

        from pipelines.train import train_local

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        summary = train_local(args.store, args.out, **kwargs)
    else:
        from pipelines.train import train_flow

        with prefect_env.api():
            summary = train_flow(args.store, args.out, **kwargs)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def run_flow(args: argparse.Namespace, flow, *flow_args, **flow_kwargs):
    """``flow`` on a Prefect API (the temporary one of :func:`prefect_env.start_api_early`, or the user's), or
    with ``--no-prefect`` its plain function: tasks as plain calls, logs on stderr, no API server."""
    if getattr(args, "no_prefect", False):
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        with prefect_env.without_prefect():
            return flow.fn(*flow_args, **flow_kwargs)
    with prefect_env.api():
        return flow(*flow_args, **flow_kwargs)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from pipelines.reconstruct import reconstruct_flow

    summary = run_flow(args, reconstruct_flow, args.store, args.checkpoint, args.out,
                       records_per_shard=args.records_per_shard, grid_times=args.grid_times,
                       grid_coords=args.grid_coords, workers=args.workers, dask_address=args.dask_address,
                       precision=args.precision, folds=args.folds, threads=args.threads, samples=args.samples or 0,
                       head=args.head, device=args.device)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate_flow

    summary = run_flow(args, evaluate_flow, args.store, args.checkpoint, args.out,
                       protocols=tuple(args.protocol or ("holdout",)), seed=args.seed, max_records=args.max_records,
                       split=args.split, samples=args.samples, head=args.head, device=args.device,
                       precision=args.precision)
    print(Path(summary["markdown"]).read_text())
    return 0


def cmd_chain(args: argparse.Namespace) -> int:
    from pipelines.chain import chain_flow

    summary = run_flow(args, chain_flow, args.source, args.path, args.store, args.checkpoint, args.out,
                       evaluation=args.evaluation, protocols=tuple(args.protocol or ("holdout",)), split=args.split,
                       shard_size=args.shard_size, options=_options(args.option), workers=args.workers,
                       grid_times=args.grid_times, folds=args.folds)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import demo_flow

    with prefect_env.api():
        d = demo_flow(args.out, steps=args.steps, workers=args.workers)
    print(f"\nPercival demo: ingest -> train -> reconstruct -> evaluate on the bundled samples, {d['seconds']} s\n")
    for name, store in d["stores"].items():
        print(f"  {name:<15} {d['records'][name]:>6,} records   {store}")
    for name, look in d["shipped"].items():
        print(f"  shipped model {name}: {look['records']:,} records reconstructed ({look['reconstruction']}); "
              f"test split, 30 % hidden: MSE {look['mse']:.3f}, {look['mse_vs_linear']:.2f}x linear interpolation")
    print(f"\n  model:           {d['checkpoint']} (final training loss {d['train_loss']:.3f})")
    print(f"  reconstructions: {d['reconstruction']} ({d['reconstructed_records']:,} records)")
    print(f"  evaluation:      {d['evaluation']}")
    for p in d["plots"]:
        print(f"  plot:            {p}")
    print()
    print(Path(d["evaluation"]).read_text())
    return 0


def _device_option(parser: argparse.ArgumentParser, default: str | None = "auto", default_text: str = "auto",
                   precision: bool = False) -> None:
    """``--device`` (and, for inference, ``--precision``)."""
    if precision:
        parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                            help="auto (default): bf16 autocast on a GPU, fp32 on a CPU")
    parser.add_argument("--device", default=default, metavar="DEVICE",
                        help="cpu, cuda, cuda:N or auto (the first GPU torch sees, else the CPU); "
                             f"default {default_text}")


def _no_prefect_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-prefect", action="store_true", help="run without Prefect (no API server, no artifact)")


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one and the help does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, [])
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


CHECKPOINT_HELP = "a checkpoint directory (written by `percival train`) or a shipped model's name (`percival models`)"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``percival`` parser and its commands' parsers by name."""
    p = argparse.ArgumentParser(
        prog="percival", formatter_class=HelpFormatter,
        description="Irregular scientific records (light curves, spectra, ICU stays) into Zarr stores, a Perceiver "
                    "IO trained on them, reconstructions and evaluations. `percival COMMAND -h` shows a command's "
                    "options; errors are one line, `percival --debug COMMAND ...` shows the traceback.")
    p.add_argument("--version", action="version", version=f"percival {_version()}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    ing = command("ingest", "ingest an archive into a Zarr store (Prefect flow)")
    ing.add_argument("source", help="source name: physionet2019, plasticc, ztf_bts, macho, desi, table "
                                    "(`percival ingest SOURCE -h` lists its options)")
    ing.add_argument("path", help="archive file or directory: a local path or an fsspec URL (s3://bucket/dir)")
    ing.add_argument("--store", required=True, help="output store: a path (OUT.zarr) or an fsspec URL")
    ing.add_argument("--shard-size", type=int, default=None, help="units (files) per shard; default per source")
    ing.add_argument("--workers", type=int, default=2, help="shards read at once")
    ing.add_argument("--runner", choices=["local", "dask"], default="local",
                     help="local (default): shards read in --workers local processes; dask: each shard a "
                          "Prefect task on a Dask cluster (local, --workers processes, or --dask-address)")
    ing.add_argument("--dask-address", default=None, help="an existing Dask scheduler, e.g. tcp://host:8786 "
                                                            "(implies --runner dask)")
    ing.add_argument("--max-record-elements", type=int, default=200_000,
                     help="records with more elements are quarantined")
    ing.add_argument("--option", action="append", metavar="KEY=VALUE",
                     help="source option, e.g. --option record_id=star (JSON values allowed); repeatable")
    ing.add_argument("--storage-option", action="append", dest="input_storage_options", metavar="KEY=VALUE",
                     help="fsspec option for reading an archive URL (s3://, gs://, https://), e.g. "
                          "--storage-option anon=true or endpoint_url=http://host:9000 (JSON values allowed); "
                          "repeatable; credentials also come from the environment (AWS_*)")
    ing.add_argument("--no-prefect", action="store_true", help="run the plain Python ingest, no Prefect")
    ing.set_defaults(fn=cmd_ingest)

    info = command("info", "summarise a store: records, elements, channels, quarantine (a reconstruction "
                           "store: its input, model and records)")
    info.add_argument("store", help="an element or reconstruction store: a path or an fsspec URL")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(fn=cmd_info)

    tr = command("train", "train a model on a store's train split (Prefect flow)")
    tr.add_argument("store", help="the element store: the train split trains, the val split is watched")
    tr.add_argument("--out", required=True, help="checkpoint directory (resumed if it holds one)")
    tr.add_argument("--preset", default="small", help="model size: tiny, small or bench (perceiver.config)")
    tr.add_argument("--steps", type=int, default=None, help="training steps (default from the config)")
    tr.add_argument("--config", default=None, help="a RunConfig JSON file (instead of --preset)")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    tr.add_argument("--head", default=None, metavar="NAME",
                    help="output head: gaussian (per-element mean and sigma; the default) or diffusion (joint "
                         "draws of a record)")
    tr.add_argument("--nproc", type=int, default=1, help="DDP processes (torchrun) on this machine")
    tr.add_argument("--nnodes", type=int, default=1, help="machines in the run; > 1 needs "
                    "--rdzv-endpoint, and the same command runs on every machine with its own --node-rank")
    tr.add_argument("--node-rank", type=int, default=0,
                    help="this machine's number, 0..nnodes-1; 0 hosts the rendezvous")
    tr.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                    help="torchrun's c10d rendezvous: HOST is the machine started with --node-rank 0")
    tr.add_argument("--rdzv-id", default=None,
                    help="rendezvous id, the same on every machine (default: percival-<name of --out>)")
    tr.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a checkpoint")
    _device_option(tr, default=None, default_text="the config's train.device, auto")
    tr.add_argument("--no-prefect", action="store_true", help="train without Prefect (no API server, no artifact)")
    tr.set_defaults(fn=cmd_train)

    rc = command("reconstruct", "batch inference over a store into a reconstruction store")
    rc.add_argument("store", help="the element store whose records are reconstructed (all of them, in order)")
    rc.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    rc.add_argument("--out", required=True, help="output Zarr store (a re-run continues it)")
    rc.add_argument("--records-per-shard", type=int, default=2000,
                    help="records per shard: one commit of the output (a re-run resumes after the last)")
    rc.add_argument("--grid-times", type=int, default=64, help="grid times per channel and record (0: none)")
    rc.add_argument("--grid-coords", type=int, default=0, help="grid wavelengths per spectral channel (0: none)")
    rc.add_argument("--workers", type=int, default=1, help="local Dask worker processes (1: no Dask)")
    rc.add_argument("--dask-address", default=None, help="an existing Dask scheduler, e.g. tcp://host:8786")
    _device_option(rc, precision=True)
    rc.add_argument("--folds", type=int, default=5, metavar="K",
                    help="out-of-sample folds per record: each element also predicted with its fold hidden, "
                         "and its residual_z, at ~K x the encoder cost (default 5; 0 or 1: off)")
    rc.add_argument("--samples", type=positive_int, default=None, metavar="K",
                    help="K draws per element and grid point (a `sample` dimension; joint over a record with the "
                         "diffusion head, independent with the Gaussian one), with their mean and 95 %% "
                         "quantiles; default none")
    rc.add_argument("--head", default=None, metavar="NAME",
                    help="check that the checkpoint has this output head (e.g. diffusion)")
    rc.add_argument("--threads", type=int, default=None,
                    help="torch threads per worker (default OMP_NUM_THREADS, else the CPUs shared by the workers)")
    _no_prefect_option(rc)
    rc.set_defaults(fn=cmd_reconstruct)

    ev = command("evaluate", "score a model and honest baselines on hidden test (or val) elements")
    ev.add_argument("store", help="the element store (its test or val split is scored)")
    ev.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    ev.add_argument("--out", required=True, help="directory for evaluation.md, evaluation.json and PNG plots")
    ev.add_argument("--protocol", action="append", metavar="P",
                    help="holdout (30%% of elements hidden at random), holdout:FRACTION, modality:NAME "
                         "(e.g. modality:labs) or channel:NAME (e.g. channel:lsst_u); repeatable; default holdout")
    ev.add_argument("--head", default=None, metavar="NAME",
                    help="check that the checkpoint has this output head (e.g. diffusion)")
    ev.add_argument("--samples", type=positive_int, default=16, metavar="K",
                    help="draws per hidden element for the distribution scores (CRPS, energy score per record, "
                         "sample coverage); default 16")
    ev.add_argument("--seed", type=int, default=0,
                    help="seed of the hidden elements (one seed hides the same elements from every method)")
    _device_option(ev, precision=True)
    ev.add_argument("--max-records", type=int, default=None, help="limit each split to its first N records")
    ev.add_argument("--split", choices=["val", "test"], default="test",
                    help="the split scored: test (default; to report) or val (to choose models and settings; "
                         "the baselines' sigma is then fitted on train)")
    _no_prefect_option(ev)
    ev.set_defaults(fn=cmd_evaluate)

    ch = command("chain", "ingest what is new, reconstruct the records the output lacks, evaluate: one flow "
                          "(what `percival serve --chain` schedules)")
    ch.add_argument("source", help="source name, as for ingest")
    ch.add_argument("path", help="archive file or directory, as for ingest")
    ch.add_argument("--store", required=True, help="the element store (created or appended to)")
    ch.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    ch.add_argument("--out", required=True, help="the reconstruction store (continued after its last record)")
    ch.add_argument("--evaluation", default=None, metavar="DIR",
                    help="evaluate the model into DIR after reconstructing; default: no evaluation")
    ch.add_argument("--protocol", action="append", metavar="P", help="evaluation protocol, as for evaluate; "
                    "repeatable; default holdout")
    ch.add_argument("--split", choices=["val", "test"], default="test", help="the split evaluated")
    ch.add_argument("--grid-times", type=int, default=64, help="grid times per channel and record, as for "
                                                                 "reconstruct (0: none)")
    ch.add_argument("--folds", type=int, default=5, metavar="K", help="out-of-sample folds, as for reconstruct "
                                                                      "(0 or 1: off)")
    ch.add_argument("--shard-size", type=int, default=None, help="units (files) per ingest shard; default per source")
    ch.add_argument("--workers", type=int, default=2, help="ingest processes")
    ch.add_argument("--option", action="append", metavar="KEY=VALUE", help="source option, as for ingest")
    _no_prefect_option(ch)
    ch.set_defaults(fn=cmd_chain)

    demo = command("demo", "ingest, train, reconstruct and evaluate on the bundled real samples")
    demo.add_argument("--out", default="percival-demo", help="output directory")
    demo.add_argument("--workers", type=int, default=2, help="processes that ingest")
    demo.add_argument("--steps", type=int, default=300, help="training steps of the demo's own model")
    demo.set_defaults(fn=cmd_demo)

    models = command("models", "list the shipped pretrained models: data, licence, test-split quality")
    models.add_argument("--json", action="store_true", help="print the model cards as JSON")
    models.set_defaults(fn=cmd_models)

    add_serve_parser(sub, HelpFormatter)
    return p, dict(sub.choices)


def main(argv: list[str] | None = None) -> int:
    p, commands = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ingest"] and {"-h", "--help"} & set(argv):
        named = [a for a in argv[1:] if not a.startswith("-")]
        if named:  # `percival ingest SOURCE -h`: the command's help and that source's options
            from datasets.sources import REGISTRY, get_source_class

            if named[0] in REGISTRY:
                commands["ingest"].print_help()
                print("\n" + get_source_class(named[0]).options_help())
                return 0
    args = p.parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `percival info X | head` ends quietly
    if not args.debug:
        prefect_env.quiet_failures()
    try:
        check_inputs(args)
        if args.fn in (cmd_ingest, cmd_train, cmd_reconstruct, cmd_evaluate, cmd_chain, cmd_demo) \
                and not getattr(args, "no_prefect", False):
            prefect_env.start_api_early()  # comes up while the command imports its flow
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - one line that names the problem, and a non-zero exit
        if args.debug:
            raise
        print(f"percival {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def check_inputs(args: argparse.Namespace) -> None:
    """Wrong input fails here, in one line, before a Prefect API server starts or a flow run is made: an unknown
    source, an archive path or a store that is not there, a checkpoint that is neither a directory nor a shipped
    model (a name is replaced by its directory), an unknown protocol."""
    if args.command in ("ingest", "chain"):
        from datasets.sources import files, get_source_class

        get_source_class(args.source)
        options = getattr(args, "input_storage_options", None)
        storage = _options(options, "--storage-option") if options else None
        if not files.exists(args.path, storage):
            raise FileNotFoundError(f"{args.path}: no such file or directory")
    if args.command == "train":  # the launch flags first: they say what to change on every node
        from pipelines.train import check_launch

        check_launch(args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint)
    if args.command in ("train", "reconstruct", "evaluate"):
        from datasets.store import open_store

        open_store(args.store)
    if args.command in ("reconstruct", "evaluate", "chain"):
        from perceiver.pretrained import resolve_checkpoint

        args.checkpoint = resolve_checkpoint(args.checkpoint)
    if args.command in ("evaluate", "chain"):
        from pipelines.run.protocols import Protocol

        for spec in args.protocol or ():
            Protocol.parse(spec)


def _one_line(error: BaseException) -> str:
    """An error as one line: bad input (ValueError, OSError, a store that is not one) by its message, anything
    else with its type and the way to see more."""
    from datasets.store import StoreError  # (imported on the error path only: zarr is slow to import)

    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (ValueError, OSError, StoreError)):
        return text
    return f"{type(error).__name__}: {text} (run `percival --debug ...` for the traceback)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("percival")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
