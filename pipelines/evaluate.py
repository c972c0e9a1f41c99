"""The ``evaluate`` Prefect flow: the fixed, seeded held-out protocol of :mod:`pipelines.run.evaluation`.

For each protocol (``holdout``: 30 % of every record's elements hidden at random; ``modality:NAME``: one whole
modality hidden) the trained model and five baselines (channel mean of the train split, per-record mean,
forward fill, per-record per-channel linear interpolation in time, and gradient boosting trained on the train
split with the decoder's evidence) predict exactly the same hidden elements of the scored split (``split``:
``test`` by default; ``val`` for choosing models and settings without touching test). The baselines'
constant σ per channel is fitted first on the hidden elements of another split: ``val`` when test is scored,
the train records held out of the gradient-boost fit when val is scored (:mod:`pipelines.run.evaluation`).

Tasks: ``plan`` (check the protocols against the store and the checkpoint), ``channel-means`` (the train
split's mean normalised value per channel, for the channel-mean baseline), ``evaluate-PROTOCOL`` (all the
numbers of one protocol: a small dict), ``plots-PROTOCOL`` (records with observed points, hidden points, the
model's mean and σ bands, linear interpolation; the calibration curve), ``report`` (``evaluation.md``,
``evaluation.json`` (which split was scored, and per protocol every method's numbers and evidence), and the
artifacts: a Markdown report, a table of every protocol × method, and the plots as image artifacts).

    from pipelines.evaluate import evaluate_flow
    evaluate_flow("physionet.zarr", "runs/physionet", "reports/physionet")                # test split
    evaluate_flow("physionet.zarr", "runs/physionet", "reports/physionet-val", split="val")  # for selection
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from pipelines import prefect_env  # (first: settings before prefect is imported)
from pipelines.retries import retry_on_io

#: PNGs up to this size are embedded in their image artifact (a data URL the Prefect UI shows); larger ones
#: are linked by file URL
MAX_EMBEDDED_PNG = 512 * 1024


@task(name="plan", task_run_name="plan")
def plan_task(store: str, checkpoint: str, protocols: list[str], head: str | None = None) -> list[str]:
    """The protocols' canonical names, after checking them against the store and the checkpoint's data
    contract (and the checkpoint's output head against ``head``, where given)."""
    from datasets.loader import match_channels
    from datasets.store import open_store
    from perceiver.checkpoint import read_model_config
    from pipelines.reconstruct import check_head
    from pipelines.run.protocols import Protocol

    s = open_store(store)
    config = read_model_config(checkpoint)
    check_head(checkpoint, config.head.name, head)
    contract = config.contract
    match_channels(contract, s.channels, store)  # the model-matches-store check, before any work
    have = contract.modalities
    names = []
    for spec in protocols:
        p = Protocol.parse(spec)
        if p.kind == "modality" and p.modality not in have:
            raise ValueError(f"protocol {spec!r}: the model has no modality {p.modality!r}; it has {have}")
        if p.kind == "channel" and p.target not in contract.channel_names:
            raise ValueError(f"protocol {spec!r}: the model has no channel {p.target!r}; it has "
                             f"{contract.channel_names}")
        names.append(p.name)
    if len(set(names)) != len(names):
        raise ValueError(f"protocols repeat: {names}")
    return names


@task(name="channel-means", task_run_name="channel-means", retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_on_io)
def channel_means_task(store: str, checkpoint: str) -> list[float]:
    from perceiver.checkpoint import read_model_config
    from pipelines.run.evaluation import train_channel_means

    return train_channel_means(store, read_model_config(checkpoint).contract).tolist()


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io, task_run_name="evaluate-{protocol}")
def evaluate_task(store: str, checkpoint: str, protocol: str, seed: int, max_records: int | None,
                  means: list[float], split: str = "test", gradient_boost_elements: int | None = None,
                  samples: int = 16, device: str = "auto", precision: str = "auto") -> dict:
    from pipelines.run.baselines import GRADIENT_BOOST_MAX_ELEMENTS
    from pipelines.run.config import load_run
    from pipelines.run.devices import inference_dtype, resolve_device
    from pipelines.run.evaluation import evaluate_protocol

    where = resolve_device(device)
    model, config = load_run(checkpoint, where)
    logger = prefect_env.run_logger()
    result = evaluate_protocol(store, model, config, protocol, seed=seed, max_records=max_records, means=means,
                               score_split=split, n_samples=samples, dtype=inference_dtype(precision, where),
                               gradient_boost_elements=gradient_boost_elements or GRADIENT_BOOST_MAX_ELEMENTS,
                               logger=logger)
    logger.info("%s: %d hidden elements of %d %s records scored; gradient_boost: %s", protocol,
                result.n_elements, result.n_records, split, result.evidence.get("gradient_boost"))
    return result.to_dict()


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io, task_run_name="plots-{protocol}")
def plots_task(store: str, checkpoint: str, protocol: str, seed: int, max_records: int | None,
               means: list[float], result: dict, out_dir: str) -> list[str]:
    from datasets.store import open_store
    from perceiver.checkpoint import load
    from pipelines.run.evaluation import ProtocolResult
    from pipelines.run.plots import calibration_plot, record_plot
    from pipelines.run.protocols import Protocol, load_split, split_plan

    model = load(checkpoint)
    s = open_store(store)
    r = ProtocolResult.from_dict(result)
    p = Protocol.parse(protocol)
    ds = load_split(s, r.score_split, model.config.contract, max_records)
    hidden = split_plan(ds, p, seed, r.score_split)
    out = Path(out_dir)
    records = record_plot(model, ds, hidden, out / f"{p.slug}-records.png", s.time_unit, means=means,
                          title=f"{protocol}: {r.score_split} records (hidden elements in red)")
    calibration = calibration_plot(r.levels, r.calibration, out / f"{p.slug}-calibration.png",
                                   title=f"{protocol}: calibration on {r.score_split}", n=r.n_elements)
    return [str(records), str(calibration)]


def _image_url(path: Path) -> str:
    data = path.read_bytes()
    if len(data) <= MAX_EMBEDDED_PNG:
        return "data:image/png;base64," + base64.b64encode(data).decode()
    return path.resolve().as_uri()


#: records of the scored split whose grid curves are checked for invented rhythms
RHYTHM_RECORDS = 200


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_on_io, task_run_name="rhythms")
def rhythms_task(store: str, checkpoint: str, split: str) -> dict:
    """Sub-Nyquist RMS of grid curves per modality, model vs PCHIP (:mod:`pipelines.run.rhythms`), on the first
    :data:`RHYTHM_RECORDS` records of the scored split."""
    from datasets.store import open_store
    from perceiver.checkpoint import load
    from pipelines.run.protocols import load_split
    from pipelines.run.rhythms import sub_nyquist_rms

    model = load(checkpoint)
    return sub_nyquist_rms(model, load_split(open_store(store), split, model.config.contract, RHYTHM_RECORDS))


@task(name="report", task_run_name="report")
def report_task(results: list[dict], plots: dict[str, list[str]], out_dir: str, store: str, checkpoint: str,
                seed: int, max_records: int | None, split: str = "test", rhythms: dict | None = None) -> dict:
    from perceiver.checkpoint import weights_sha256
    from pipelines.run.evaluation import ProtocolResult
    from pipelines.run.protocols import Protocol
    from pipelines.run.report import distribution_markdown, report_markdown, rhythms_markdown, table_rows

    out = Path(out_dir)
    res = [ProtocolResult.from_dict(r) for r in results]
    names = {p: [Path(x).name for x in paths] for p, paths in plots.items()}
    markdown = (report_markdown(res, store, checkpoint, names) + distribution_markdown(res)
                + rhythms_markdown(rhythms or {}, RHYTHM_RECORDS))
    md_path, json_path = out / "evaluation.md", out / "evaluation.json"
    md_path.write_text(markdown + "\n")
    doc = {"store": store, "checkpoint": checkpoint, "checkpoint_sha256": weights_sha256(checkpoint),
           "split": split, "seed": seed, "max_records": max_records,
           "created": datetime.now(UTC).isoformat(timespec="seconds"),
           "protocols": results, "plots": names, "sub_nyquist_rms": rhythms or {}}
    json_path.write_text(json.dumps(doc, indent=1, default=float) + "\n")

    summary = {"markdown": str(md_path), "json": str(json_path), "out_dir": str(out), "split": split,
               "plots": [p for paths in plots.values() for p in paths],
               "protocols": {r.protocol: {"n_records": r.n_records, "n_elements": r.n_elements,
                                          "mse": {m: r.metrics[m].get("overall", {}).get("mse") for m in r.metrics},
                                          "mse_vs_linear": _ratio(r)} for r in res}}
    if prefect_env.prefect_off():
        return summary
    # artifacts: the report (plots listed by path: the UI cannot read local files), a table, the plots
    listing = {p: [f"`{x}`" for x in paths] for p, paths in plots.items()}
    create_markdown_artifact(report_markdown(res, store, checkpoint, listing, embed=False),
                             key="evaluation-report", description=f"evaluate {checkpoint} on {store}")
    create_table_artifact(table_rows(res), key="evaluation-summary",
                          description=f"normalised MSE, MAE, NLL, 68/95 % coverage on the {split} split's hidden "
                                      "elements, per protocol and method")
    for protocol, paths in plots.items():
        for p in paths:
            kind = Path(p).stem.rsplit("-", 1)[-1]
            create_image_artifact(_image_url(Path(p)), key=f"evaluation-{Protocol.parse(protocol).slug}-{kind}",
                                  description=f"{protocol}: {Path(p).name}")
    return summary


def _ratio(result) -> float | None:
    value = float(result.table().loc["model", "mse_vs_linear"])
    return value if value == value else None


@flow(name="evaluate", log_prints=True)
def evaluate_flow(store: str, checkpoint: str, out_dir: str, protocols: tuple[str, ...] | list[str] = (
        "holdout", "modality:labs"), seed: int = 0, max_records: int | None = None, split: str = "test",
        gradient_boost_elements: int | None = None, samples: int = 16, head: str | None = None,
        device: str = "auto", precision: str = "auto") -> dict:
    """Evaluate the checkpoint in ``checkpoint`` (a directory, or a shipped model's name) on the store at ``store``
    under each protocol (``holdout``, ``holdout:FRACTION``, ``modality:NAME``, ``channel:NAME``) on the ``split``
    split (``test``, or ``val`` to choose models and settings); write ``evaluation.md``, ``evaluation.json`` and PNG
    plots into ``out_dir``; publish them as artifacts. ``max_records`` limits each split to its first records (a
    quick look);
    ``gradient_boost_elements`` caps the gradient-boost baseline's training elements (default
    :data:`pipelines.run.baselines.GRADIENT_BOOST_MAX_ELEMENTS`); ``samples`` draws per hidden element score
    the model's distribution (CRPS, energy score, sample coverage); ``head``, where given, must be the
    checkpoint's output head; ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) and ``precision`` (``auto``:
    bf16 autocast on a GPU, fp32 on a CPU) are the model's. Returns a small summary: files, the split, and per
    protocol the counts and the overall MSE per method."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if samples < 1:
        raise ValueError(f"--samples must be a positive number of draws, got {samples}")
    from perceiver.pretrained import resolve_checkpoint
    from pipelines.run.devices import resolve_device

    resolve_device(device)  # a GPU asked for where there is none fails before any work
    checkpoint = resolve_checkpoint(checkpoint)  # a directory, or a shipped model's name
    t0 = time.perf_counter()
    logger = prefect_env.run_logger()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    names = prefect_env.run(plan_task, store, checkpoint, list(protocols), head)
    means = prefect_env.run(channel_means_task, store, checkpoint)
    results, plots = [], {}
    for name in names:
        result = prefect_env.run(evaluate_task, store, checkpoint, name, seed, max_records, means, split,
                                 gradient_boost_elements, samples, device, precision)
        plots[name] = prefect_env.run(plots_task, store, checkpoint, name, seed, max_records, means, result, out_dir)
        results.append(result)
    rhythms = prefect_env.run(rhythms_task, store, checkpoint, split)
    summary = prefect_env.run(report_task, results, plots, out_dir, store, checkpoint, seed, max_records, split,
                              rhythms)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    logger.info("evaluation written to %s", summary["markdown"])
    return summary
