"""The command blocks of README.md and docs/*.md run as written, on the bundled samples.

Every ``bash`` block runs in a shell (after the page's ``toml`` blocks that start with ``# NAME.toml`` are
written to NAME.toml) and every ``python`` block in an interpreter (a file's Python blocks in one,
in order: later blocks use what earlier ones made), in a fresh folder with the ``percival`` environment on the
PATH. The only edits are the :data:`SMALL` substitutions, each of which makes an input small or a command that
would run for hours or forever finite. A block preceded by ``<!-- not run: REASON -->`` is skipped; the reason
says where else it is exercised.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?P<before>(?:[ \t]*<!--[^\n]*-->\n)?)[ \t]*```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)

#: (pattern, replacement) applied to every block: the full archives become the bundled samples, training
#: becomes a few steps of the tiny model, a schedule prints its deployments instead of serving forever
SMALL = [
    (r"\.\./shared/data/", f"{SAMPLES}/"),
    (r"(?<![\w/])datasets/samples/", f"{SAMPLES}/"),
    (r"(percival train [^\n#]*?)(\s*(#.*)?)$", r"\1 --preset tiny --steps 4\2"),
    (r"(percival evaluate [^\n#]*?)(\s*(#.*)?)$", r"\1 --max-records 40\2"),
    (r"(percival (?:reconstruct|chain) [^\n#]*?)(\s*(#.*)?)$", r"\1 --folds 0\2"),  # one encoder pass a record
    (r"percival serve (?!.*&\s*$)", "percival serve --dry-run "),  # one in the background is the real thing
    (r"(percival demo)\b", r"\1 --steps 4"),
    (r"ModelConfig\.preset\(\"small\"\)", 'ModelConfig.preset("tiny")'),
    (r"steps=1000\b", "steps=4"),
]


def blocks(path: Path) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, reason not run) of every bash / python block of ``path``."""
    text = path.read_text()
    out = []
    for m in BLOCK.finditer(text):
        reason = re.match(r"<!-- not run: (.*) -->", m["before"].strip())
        out.append((text[:m.start("lang")].count("\n") + 1, m["lang"], textwrap.dedent(m["code"]),
                    reason[1] if reason else None))
    return out


def small(code: str) -> str:
    code = re.sub(r"\\\n\s*", " ", code)  # continuation lines joined: each command on one line
    for pattern, replacement in SMALL:
        code = re.sub(pattern, replacement, code, flags=re.M)
    return code


CASES = [pytest.param(doc, lang, id=f"{doc.relative_to(ROOT)}-{lang}") for doc in DOCS
         for lang in ("bash", "python") if any(b[1] == lang for b in blocks(doc))]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> str:
    """One real Prefect server for the page's commands (each would otherwise start a temporary one)."""
    from prefect_runs import prefect_server

    with prefect_server(tmp_path_factory.mktemp("docs-prefect")) as api:
        yield api


@pytest.mark.slow
@pytest.mark.parametrize("doc, lang", CASES)
def test_command_blocks_run_as_written(doc, lang, tmp_path, prefect_api):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "MPLBACKEND": "Agg", "PREFECT_API_URL": prefect_api}
    chosen = [(line, code) for line, kind, code, reason in blocks(doc) if kind == lang and reason is None]
    if not chosen:
        pytest.skip(f"every {lang} block of {doc.name} is marked not run")
    if lang == "python":
        script = "\n".join(f"# {doc.name}:{line}\n{small(code)}" for line, code in chosen)
        r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"{doc.name} python blocks:\n{r.stderr[-4000:]}"
        return
    for name, toml in re.findall(r"```toml\n# ([\w.-]+\.toml)[^\n]*\n(.*?)```", doc.read_text(), re.S):
        (tmp_path / name).write_text(toml)
    for line, code in chosen:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", small(code)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{doc.name}:{line}\n{small(code)}\n--- stderr\n{r.stderr[-4000:]}"


def test_every_runnable_block_is_kept_small():
    """The substitutions find what they are for: no block trains for long or serves forever."""
    for doc in DOCS:
        for line, lang, code, reason in blocks(doc):
            code = small(code)
            if reason is None and lang == "bash":
                assert "../shared/data" not in code, f"{doc.name}:{line}"
                for cmd in re.findall(r"percival (?:train|serve) [^\n]*", code):
                    finite = "--steps 4" in cmd or "--dry-run" in cmd or cmd.rstrip().endswith("&")
                    assert finite, f"{doc.name}:{line}: {cmd}"
