"""The evaluation report: Markdown tables of :class:`~pipelines.run.evaluation.ProtocolResult` s."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.run.evaluation import EVIDENCE, METRIC_COLUMNS, ProtocolResult

# ---------------------------------------------------------------------------------------------------------

#: the per-channel MSE table's columns (method -> heading)
PER_CHANNEL_COLUMNS = {"model": "model", "linear_interpolation": "lin. interp.", "forward_fill": "fwd fill",
                       "per_record_mean": "record mean", "channel_mean": "channel mean",
                       "gradient_boost": "grad. boost"}


def _fmt(x) -> str:
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.3g}"


def markdown_table(df: pd.DataFrame) -> str:
    """A results table (rows: methods) as GitHub Markdown."""
    cols = {"mse": "MSE", "mae": "MAE", "nll": "NLL", "coverage68": "cov68", "coverage95": "cov95", "n": "n",
            "mse_vs_linear": "MSE / lin. interp."}
    lines = ["| method | " + " | ".join(cols.values()) + " |", "|---|" + "---:|" * len(cols)]
    for method, row in df.iterrows():
        lines.append(f"| {method} | " + " | ".join(_fmt(int(row[c]) if c == "n" else row[c]) for c in cols) + " |")
    return "\n".join(lines)


def table_rows(results: list[ProtocolResult]) -> list[dict]:
    """Flat rows (protocol, method, metrics) for a table artifact or a CSV."""
    rows = []
    for r in results:
        df = r.table()
        for method, row in df.iterrows():
            rows.append({"protocol": r.protocol, "method": method,
                         **{c: (None if not np.isfinite(row[c]) else round(float(row[c]), 6))
                            for c in (*METRIC_COLUMNS[:-1], "mse_vs_linear")},
                         "n": int(row["n"])})
    return rows


def report_markdown(results: list[ProtocolResult], store: str = "", checkpoint: str = "",
                    plots: dict[str, list[str]] | None = None, embed: bool = True) -> str:
    """The evaluation report: per protocol, the overall table (caption says how it was scored), the
    per-modality tables, a per-channel MSE table, and the plots (``plots``: protocol -> file names, shown as
    images when ``embed``, else listed)."""
    out = ["# Evaluation", ""]
    if store or checkpoint:
        out += [f"Store `{store}`, checkpoint `{checkpoint}`.", ""]
    out += ["All numbers are in normalised units, z = (T(v) − location) / scale with the channel table's "
            "train-split statistics (location the median, scale the standard deviation after clipping to the "
            "0.1–99.9 % quantiles), so 1 ≈ one train-split standard deviation of the channel. NLL and coverage use "
            "N(μ, σ² + e²) with e the normalised measurement error (unknown = 0); a calibrated predictor covers "
            "0.683 and 0.95 (cov95 is the 95 % interval a reconstruction stores as `lower95` / `upper95`). "
            "`MSE / lin. interp.` is each method's MSE divided by linear interpolation's.", ""]
    if any(r.score_split == "val" for r in results):
        out += ["**Validation split scored** (`--split val`: for choosing models and settings; report the test "
                "split). The baselines' σ is fitted on train-split records the gradient-boost baseline was not "
                "trained on.", ""]
    for r in results:
        out += [f"## Protocol `{r.protocol}`", "",
                f"{r.description}; seed {r.seed}. Scored on {r.n_elements:,} hidden elements of "
                f"{r.n_records:,} {r.score_split}-split records — exactly the same elements for the model and "
                f"every baseline. Model σ: its own prediction. Baseline σ: {r.sigma_source}; then scored on the "
                f"{r.score_split} split.", ""]
        evidence = r.evidence or {m: EVIDENCE[m] for m in r.methods if m in EVIDENCE}
        if evidence:
            out += ["What each method sees:", ""]
            out += [f"- `{m}`: {evidence[m]}" for m in r.methods if m in evidence]
            out += [""]
        out += [markdown_table(r.table()), ""]
        modalities = list(r.metrics["model"].get("modality", {}))
        if len(modalities) > 1:
            for m in modalities:
                out += [f"**{m}**", "", markdown_table(r.table("modality", m)), ""]
        channels = r.metrics["model"].get("channel", {})
        if channels:
            shown = [m for m in PER_CHANNEL_COLUMNS if m in r.metrics]
            heads = [PER_CHANNEL_COLUMNS[m] for m in shown]
            out += [f"<details><summary>Per channel (MSE: {' / '.join(heads)}; n)</summary>", "",
                    "| channel | " + " | ".join(heads) + " | n |", "|---|" + "---:|" * (len(shown) + 1)]
            for c, m in channels.items():
                mse = [_fmt(r.metrics[k].get("channel", {}).get(c, {}).get("mse")) for k in shown]
                out.append(f"| {c} | " + " | ".join(mse) + f" | {m['n']:,} |")
            out += ["", "</details>", ""]
        paths = (plots or {}).get(r.protocol, [])
        if embed:
            out += [line for path in paths for line in (f"![{path}]({path})", "")]
        elif paths:
            out += ["Plots: " + ", ".join(paths), ""]
    return "\n".join(out)


def distribution_markdown(results) -> str:
    """The proper-score section (:func:`pipelines.run.evaluation.distribution_scores`): per protocol, each
    method's Gaussian CRPS, and the model's sample CRPS, energy score (against independent Gaussian draws from
    its own marginals) and sample coverage."""
    out = []
    for r in results:
        d = r.distribution or {}
        if not d.get("methods"):
            continue
        model = d["methods"].get("model", {})
        out += ["", f"## Distribution scores: {r.protocol}", "",
                "CRPS per hidden element (normalised units; lower is better), Gaussian closed form from each "
                "method's mean and σ (with the measurement error in quadrature).", "",
                "| method | CRPS |", "|---|---:|"]
        out += [f"| {m} | {_fmt(v['crps_gaussian']['overall'])} |" for m, v in d["methods"].items()]
        if "energy_score" in model:
            cov = ", ".join(f"{float(k):.0%}: {_fmt(v)}" for k, v in model["sample_coverage"].items())
            out += ["", f"From {d['n_samples']} draws per hidden element (joint over a record's elements where the "
                    "head models that): sample CRPS " + _fmt(model["crps_samples"]["overall"]) + "; energy score per "
                    f"record {_fmt(model['energy_score'])} against {_fmt(model['energy_score_independent'])} for "
                    f"independent Gaussian draws from the same marginals "
                    f"({_fmt(model['energy_score_vs_independent'])}×); coverage of the draws' central intervals: "
                    f"{cov}."]
    return "\n".join(out) + "\n" if out else ""


def rhythms_markdown(table: dict[str, dict], n_records: int) -> str:
    """The invented-rhythm section (:mod:`pipelines.run.rhythms`): per modality, the mean sub-Nyquist RMS of the
    model's grid curves and of PCHIP's."""
    if not table:
        return ""
    out = ["", "## Invented rhythms (grid curves)", "",
           f"First {n_records} records of the scored split, every element visible; per (record, channel) with at "
           "least 3 observations, 64 grid times between the channel's first and last observation. RMS "
           "(normalised units) of the curve's content at periods shorter than twice the channel's median gap "
           "in the record (what its sampling cannot support), after removing the line through the curve's "
           "end points; PCHIP through the same observations is the reference (≤ 1.0× is the aim). *model*: "
           "the curve as `reconstruct` writes it (band-limited at the channel's Nyquist period); *decoder*: "
           "the decoder's curve before that.", "",
           "| modality | curves | model | decoder | PCHIP | model / PCHIP | decoder / PCHIP |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {m} | {r['curves']:,} | {_fmt(r['model'])} | {_fmt(r.get('model_raw'))} | {_fmt(r['pchip'])} | "
            f"{_fmt(r['model_vs_pchip'])} | {_fmt(r.get('model_raw_vs_pchip'))} |" for m, r in table.items()]
    return "\n".join(out) + "\n"
