"""``make reproduce``'s scheduler (analysis/pipeline.py): setup notebooks alone, the rest side by side."""
from __future__ import annotations

import json
import re

import nbformat

from decoflow_core.analysis import pipeline


def _notebook(path, body: str, after: list[str] | None = None) -> None:
    """A notebook with a ``parameters`` cell (LOG) and one code cell ``body``, waiting for ``after``."""
    nb = nbformat.v4.new_notebook()
    if after:
        nb.metadata["decoflow"] = {"after": after}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('LOG = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, str(path))


def _span(name: str, seconds: float) -> str:
    """Cell source that appends (name, start, end) to LOG around a sleep."""
    return (f"import json, time\nstart = time.time()\ntime.sleep({seconds})\n"
            f"open(LOG, 'a').write(json.dumps([{name!r}, start, time.time()]) + '\\n')")


def test_setup_notebooks_run_alone_then_the_rest_side_by_side(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    names = ["00_setup", "02_left", "03_right"]
    for name in names:
        _notebook(tmp_path / f"{name}.ipynb", _span(name, 2.0))
    notebooks = [tmp_path / f"{n}.ipynb" for n in names]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert pipeline.run_all(notebooks, out_dir, {"LOG": str(log)}, parallel=2) is None
    spans = {n: (s, e) for n, s, e in map(json.loads, log.read_text().splitlines())}
    assert spans["00_setup"][1] <= min(spans["02_left"][0], spans["03_right"][0])  # setup first, alone
    assert spans["02_left"][0] < spans["03_right"][1] and spans["03_right"][0] < spans["02_left"][1]  # overlap
    out = capsys.readouterr().out
    assert all(f"{n}.ipynb done in" in out for n in names)
    assert all((out_dir / f"{n}.ipynb").exists() for n in names)  # the executed copies


def test_a_failing_notebook_is_named_and_nothing_starts_after_it(tmp_path):
    log = tmp_path / "log.jsonl"
    _notebook(tmp_path / "02_fails.ipynb", "raise ValueError('bad input here')")
    _notebook(tmp_path / "03_running.ipynb", _span("03_running", 8.0))  # still running when 02 fails
    _notebook(tmp_path / "04_later.ipynb", _span("04_later", 0.0))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    notebooks = [tmp_path / n for n in ("02_fails.ipynb", "03_running.ipynb", "04_later.ipynb")]
    failure = pipeline.run_all(notebooks, out_dir, {"LOG": str(log)}, parallel=2)
    assert re.fullmatch(r"02_fails.ipynb, cell \d+: ValueError: bad input here", failure)
    assert [json.loads(line)[0] for line in log.read_text().splitlines()] == ["03_running"]  # finished, 04 never ran


def test_a_notebook_starts_after_those_its_metadata_names(tmp_path):
    log = tmp_path / "log.jsonl"
    _notebook(tmp_path / "02_trains.ipynb", _span("02_trains", 3.0))
    _notebook(tmp_path / "03_reads.ipynb", _span("03_reads", 0.0), after=["02_trains"])
    _notebook(tmp_path / "04_alone.ipynb", _span("04_alone", 0.0))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    notebooks = [tmp_path / n for n in ("02_trains.ipynb", "03_reads.ipynb", "04_alone.ipynb")]
    assert pipeline.run_all(notebooks, out_dir, {"LOG": str(log)}, parallel=2) is None
    spans = {n: (s, e) for n, s, e in map(json.loads, log.read_text().splitlines())}
    assert spans["04_alone"][1] < spans["02_trains"][1]  # took the free slot while 02 ran
    assert spans["03_reads"][0] >= spans["02_trains"][1]  # waited for 02
    assert pipeline.after(out_dir / "03_reads.ipynb") == {"02_trains"}  # papermill keeps the metadata
