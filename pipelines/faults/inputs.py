"""Bad and hostile input: every kind of malformed file is quarantined with its reason, a file that vanishes
mid-ingest is quarantined, and pickles or code where a checkpoint, a staged shard or a config would be never
run."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np

from pipelines.faults.harness import Row
from pipelines.faults.inject import Payload


def bad_input(work: Path, corpus) -> list[Row]:
    """Every corpus kind gives its quarantine row; totals reconcile; the good files' records are unchanged.

    ``corpus``: a bad-input corpus on disk (``build_corpus`` of ``tests/corpus.py``): per source its folder,
    ingest options and good records, and the cases (kind, file, expected quarantine reason)."""
    from datasets.ingest import ingest
    from datasets.store import open_store

    kinds = Row("bad-input kinds: each gives its quarantine row", note="")
    totals = Row("ingest runs over the corpus: read = stored + quarantined, good records unchanged")
    read = stored = quarantined = 0
    for src, folder in corpus.folders.items():
        path, options = str(work / f"corpus-{src}.zarr"), corpus.options.get(src)
        report = ingest(src, str(folder), path, options=options)
        s = open_store(path)
        q = s.quarantine
        for case in (x for x in corpus.cases if x.source == src):
            hit = q["source_file"].str.endswith(case.file) & q["reason"].str.contains(case.reason, regex=False)
            kinds.check(bool(hit.any()), f"{case.kind}: no quarantine row for {case.file} with {case.reason!r}")
        read, stored = read + report.elements_read, stored + report.elements_stored
        quarantined += report.elements_quarantined
        same = True
        if corpus.good_records[src]:  # the good files alone give the same records, element for element
            alone = work / f"corpus-{src}-good"
            alone.mkdir()
            for f in folder.iterdir():
                if f.name.startswith(("a_good", "ZTFgood", "lc_2.", "b.csv")):
                    shutil.copy(f, alone)
            clean = open_store(str(ingest(src, str(alone), str(alone) + ".zarr", options=options).store))
            a, b = clean.select(corpus.good_records[src]), s.select(corpus.good_records[src])
            same = all(np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True)
                       for k in ("time", "value", "error", "coord", "row_size"))
            same &= list(clean.channels["name"]) == list(s.channels["name"])[:len(clean.channels)]
        totals.check(report.reconciles and s.n_elements == report.elements_stored and same,
                     f"{src}: reconciles={report.reconciles} good records unchanged={same}")
    kinds.note = f"{len(corpus.cases)} kinds in 6 sources"
    totals.note = f"{read:,} elements read = {stored:,} stored + {quarantined:,} quarantined"
    return [kinds, totals]


def vanishing_file(work: Path, stay: bytes) -> Row:
    """A file deleted after discovery, while earlier shards are being committed: quarantined, rest stored.
    ``stay``: the bytes of a valid PhysioNet ``.psv`` stay, written four times."""
    from datasets.ingest import ingest
    from datasets.store import open_store

    row = Row("a file that vanishes mid-ingest")
    d = work / "vanish"
    d.mkdir()
    for i in range(4):
        (d / f"p{i}.psv").write_bytes(stay)

    def progress(index: int, report) -> None:
        if index == 0:
            (d / "p2.psv").unlink()

    report = ingest("physionet2019", str(d), str(work / "vanish.zarr"), shard_size=1, progress=progress)
    s = open_store(str(work / "vanish.zarr"))
    q = s.quarantine
    row.check(report.reconciles and s.n_records == 3 and (q["source_file"] == "p2.psv").any()
              and "FileNotFoundError" in " ".join(q["reason"]), f"records={s.n_records}")
    return row


def untrusted_files(work: Path, checkpoint_dir: str) -> Row:
    """Malicious pickles where a checkpoint's weights / training state and a staged shard would be, and a
    config with code in it: each is refused, and the payload never runs."""
    import torch

    from perceiver import checkpoint
    from pipelines.run.config import RunConfig

    row = Row("untrusted files: pickle payloads as weights / training state / staged shard, code in config",
              note="payload never ran; pickles refused; code in a numeric config field refused (wrong type)")
    marker = work / "PAYLOAD_RAN"
    evil = pickle.dumps(Payload(str(marker)))
    trials = []
    d = work / "evil-ckpt"
    shutil.copytree(checkpoint_dir, d)
    torch.save({"model": Payload(str(marker))}, d / checkpoint.STATE)  # a real torch zip holding the payload
    trials.append(("training_state.pt (torch.save of a payload)", lambda: checkpoint.load_training_state(d)))
    d2 = work / "evil-ckpt2"
    shutil.copytree(checkpoint_dir, d2)
    (d2 / checkpoint.STATE).write_bytes(evil)
    trials.append(("training_state.pt (raw pickle)", lambda: checkpoint.load_training_state(d2)))
    d3 = work / "evil-ckpt3"
    shutil.copytree(checkpoint_dir, d3)
    (d3 / checkpoint.WEIGHTS).write_bytes(evil)
    trials.append(("model.safetensors (raw pickle)", lambda: checkpoint.load(d3)))
    npz = work / "shard-evil.npz"
    np.savez(npz, record_id=np.array([Payload(str(marker))], dtype=object))
    trials.append(("staged shard .npz with an object array", lambda: _load_npz(npz)))
    cfg = json.loads((Path(checkpoint_dir) / checkpoint.CONFIG).read_text())
    cfg["train"]["steps"] = f"__import__('os').system('touch {marker}')"
    trials.append(("config.json with code in a field", lambda: RunConfig.from_json(json.dumps(cfg))))
    cfg2 = dict(cfg, __reduce__="exec")
    trials.append(("config.json with an unknown key", lambda: RunConfig.from_json(json.dumps(cfg2))))
    for what, fn in trials:
        try:
            fn()
            refused = False
        except Exception:  # noqa: BLE001 - any clear refusal counts; the marker says whether code ran
            refused = True
        # a config field holding code is refused (wrong type) or inert text (JSON is never evaluated)
        row.check((refused or what.startswith("config.json with code")) and not marker.exists(),
                  f"{what}: refused={refused} payload ran={marker.exists()}")
    return row


def _load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:  # as the reconstruct flow's commit task loads staged shards
        return {k: z[k] for k in z.files}
