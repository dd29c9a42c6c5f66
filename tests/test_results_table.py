"""`quantzoo table`: results tables and charts generated from run records, deterministically and atomically."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

from zoo.cli import main
from zoo.registry import default_registry
from zoo.results import RecordError, render_results, result_rows
from zoo.results.markdown import chart_names
from zoo.results.records import check_record

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
TEMPLATE_PATH = sorted((RESULTS / "runs").glob("efficientnet_lite0__w8a8_per_channel__*.json"))[0]


def _cards():
    registry = default_registry()
    return {name: registry.get(name) for name in registry.list()}


def _record(model="efficientnet_lite0", recipe="w8a8_per_channel", stamp="20260101T000000Z", tag="00000001",
            top1=80.0, fp32=80.4, bits=(8, 8), cost=None, dataset="imagenet_sample"):
    """A run record shaped like the committed ones, with the given identity and numbers (and a
    ``cost`` block only when ``cost`` is given)."""
    record = copy.deepcopy(json.loads(TEMPLATE_PATH.read_text()))
    record.update(run_id=f"{model}__{recipe}__{stamp}__{tag}", model=model, recipe=recipe, dataset=dataset)
    record["metrics"]["quantsim"].update(top1=top1, top1_ci95=[top1 - 3.0, top1 + 2.5])
    record["metrics"]["onnxruntime"].update(top1=top1 - 0.1)
    record["metrics"]["fp32"].update(top1=fp32)
    record["provenance"]["config"]["quant"].update(weight_bits=bits[0], activation_bits=bits[1])
    record.pop("cost", None)  # the template may carry one: only the given cost goes in
    if cost is not None:
        record["cost"] = cost
    return record


def _write(runs: Path, *records) -> None:
    runs.mkdir(parents=True, exist_ok=True)
    for record in records:
        (runs / f"{record['run_id']}.json").write_text(json.dumps(record))


def _csv_rows(files, dataset="imagenet_sample"):
    return list(csv.DictReader(io.StringIO(files[f"{dataset}.csv"].decode())))


def test_committed_tables_regenerate_byte_identical_from_committed_records():
    files = render_results(RESULTS / "runs", _cards())
    assert set(files) >= {"README.md", "imagenet_sample.csv", *chart_names("imagenet_sample")}
    for name, data in files.items():
        if name.endswith(".png") and _png_text(RESULTS / name).get("Software") != f"matplotlib {matplotlib.__version__}":
            continue  # charts are byte-stable per matplotlib version; the text tables always are
        assert (RESULTS / name).read_bytes() == data, f"results/{name} is stale: run `quantzoo table`"
    assert main(["table", "--check", "--results-dir", str(RESULTS)]) == 0


def test_readme_shows_published_beside_ours_and_says_how_the_eval_sets_differ():
    readme = (RESULTS / "README.md").read_text()
    all_rows = list(csv.DictReader(io.StringIO((RESULTS / "imagenet_sample.csv").read_text())))
    rows = {r["recipe"]: r for r in all_rows if r["model"] == "efficientnet_lite0"}
    card = default_registry().get("efficientnet_lite0")
    ours = rows["w8a8_per_channel"]
    assert float(ours["published_top1"]) == card.published_result("w8a8").value
    assert float(ours["published_fp32_top1"]) == card.published_result("fp32").value
    assert ours["sim_minus_published"] == f"{float(ours['sim_top1']) - card.published_result('w8a8').value:+.2f}"
    assert "750-image eval split of a 1,000-image ImageNet-1k sample" in readme
    assert "50,000-image ImageNet-1k validation set" in readme
    assert "| Task | Network | Source | FP32 | W8A8 | W4A8 | Other recipes |" in readme
    # the W4A8 column shows the published number, beside our run when there is one
    w4a8 = card.published_result("w4a8").value
    if "w4a8" in rows:
        assert f"w4a8: **{float(rows['w4a8']['sim_top1']):.2f}**" in readme and f"published {w4a8:.2f}" in readme
    else:
        assert f"published {w4a8:.2f} (no run yet)" in readme
    for row in all_rows:
        assert f"(runs/{row['run_id']}.json)" in readme
        assert (RESULTS / row["record"]).is_file() and row["num_eval_samples"] == "750"
    for name in chart_names("imagenet_sample"):
        assert f"]({name})" in readme


def test_csv_columns_are_snake_case_and_rows_sorted_whatever_the_file_order(tmp_path):
    records = [_record(recipe=r, tag=f"0000000{i}") for i, r in enumerate(["w8a8_per_tensor", "w4a8", "w8a8_per_channel"])]
    records.append(_record(model="toy_net", recipe="w8a8", tag="0000000a"))
    forward, backward = tmp_path / "a" / "runs", tmp_path / "b" / "runs"
    _write(forward, *records)
    _write(backward, *reversed(records))
    files = render_results(forward, _cards())
    assert files == render_results(backward, _cards())
    header = files["imagenet_sample.csv"].decode().splitlines()[0].split(",")
    assert all(re.fullmatch(r"[a-z0-9_]+", column) for column in header)
    rows = _csv_rows(files)
    assert [(r["model"], r["recipe"]) for r in rows] == [
        ("efficientnet_lite0", "w4a8"), ("efficientnet_lite0", "w8a8_per_channel"),
        ("efficientnet_lite0", "w8a8_per_tensor"), ("toy_net", "w8a8")]
    assert rows[0]["published_top1"] == "74.46" and rows[0]["published_recipe"] == "w4a8"
    assert rows[3]["published_top1"] == "" and "(not in the zoo)" in files["README.md"].decode()


def test_the_newest_record_of_a_model_and_recipe_is_used(tmp_path):
    runs = tmp_path / "runs"
    _write(runs,
           _record(stamp="20260101T000000Z", tag="ffffffff", top1=11.0),
           _record(stamp="20260301T000000Z", tag="00000001", top1=33.0),  # newest stamp wins
           _record(stamp="20260201T000000Z", tag="aaaaaaaa", top1=22.0))
    rows, count = result_rows(runs, _cards())
    assert count == 3 and [r.sim_top1 for r in rows] == [33.0]
    _write(runs, _record(stamp="20260301T000000Z", tag="00000002", top1=44.0))  # same second: run id decides
    rows, _ = result_rows(runs, _cards())
    assert [r.sim_top1 for r in rows] == [44.0]
    readme = render_results(runs, _cards())["README.md"].decode()
    assert "4 run record(s); 1 shown" in readme and "44.00" in readme and "33.00" not in readme


def test_bitops_come_from_the_record_cost_and_missing_cost_is_blank(tmp_path):
    cost = {"macs": 385_187_552, "bitops": 385_187_552 * 64, "weight_bytes": 4_697_024}
    _write(tmp_path / "runs", _record(recipe="w8a8_per_channel", cost=cost), _record(recipe="w8a8_per_tensor", tag="00000002"))
    files = render_results(tmp_path / "runs", _cards())
    with_cost, without = _csv_rows(files)
    assert (with_cost["macs"], with_cost["bitops"], with_cost["weight_bytes"]) == (str(cost["macs"]), str(cost["bitops"]), "4697024")
    assert without["bitops"] == without["macs"] == ""
    assert "| 24.65 |" in files["README.md"].decode()  # GBOPs of the costed row
    _write(tmp_path / "none" / "runs", _record(recipe="w8a8_per_tensor", tag="00000002"))
    empty = render_results(tmp_path / "none" / "runs", _cards())
    _, bitops_png = chart_names("imagenet_sample")
    assert files[bitops_png] != empty[bitops_png]  # the costed row is drawn; the other chart has no point


def _with_mixed_precision(record: dict, groups_per_candidate: dict, *, autoquant: bool = False) -> dict:
    summary = {"groups_per_candidate": groups_per_candidate, "met": True}
    step = {"name": "mixed_precision", "summary": summary}
    if autoquant:
        step = {"name": "autoquant", "summary": {"applied": ["cle", "mixed_precision"], "trials": [
            {"rung": "mixed_precision", "tried": True, "kept": True, "summary": summary}]}}
    record.setdefault("ptq", {})["steps"] = [step]
    return record


def test_a_mixed_precision_result_is_not_filed_under_its_recipes_starting_bits(tmp_path):
    _write(tmp_path / "runs",
           _with_mixed_precision(_record(recipe="mp", tag="00000001"), {"w4a8": 9, "w8a8": 41}),
           _with_mixed_precision(_record(recipe="mp_autoquant", tag="00000002"), {"w4a8": 3, "w8a8": 47}, autoquant=True),
           _with_mixed_precision(_record(recipe="mp_widest", tag="00000003"), {"w16a16": 50}),
           _with_mixed_precision(_record(recipe="mp_unmet", tag="00000004"), {"w8a8": 50}))
    files = render_results(tmp_path / "runs", _cards())
    rows = {r["recipe"]: r for r in _csv_rows(files)}
    for recipe in ("mp", "mp_autoquant", "mp_widest"):  # formats other than the recipe's: mixed, no bits
        assert (rows[recipe]["weight_bits"], rows[recipe]["activation_bits"], rows[recipe]["mixed_precision"]) == ("", "", "true")
    assert (rows["mp_unmet"]["weight_bits"], rows["mp_unmet"]["mixed_precision"]) == ("8", "false")  # stayed all-w8a8
    readme = files["README.md"].decode()
    zoo_line = next(line for line in readme.splitlines() if line.startswith("| Image classification | `efficientnet_lite0`"))
    w8a8_cell, w4a8_cell, other_cell = zoo_line.split(" | ")[4:7]
    assert "mp_unmet" in w8a8_cell and "mp:" not in w8a8_cell and "mp_widest" not in w8a8_cell
    assert all(name in other_cell for name in ("mp:", "mp_autoquant", "mp_widest"))
    assert "| `efficientnet_lite0` | mp | mixed |" in readme


def test_charts_are_deterministic_pngs_without_timestamps(tmp_path):
    _write(tmp_path / "runs", _record(), _record(recipe="w4a8", bits=(4, 8), tag="00000002", top1=70.0))
    first, second = render_results(tmp_path / "runs", _cards()), render_results(tmp_path / "runs", _cards())
    for name in chart_names("imagenet_sample"):
        assert first[name] == second[name]
        image = Image.open(io.BytesIO(first[name]))
        assert image.format == "PNG" and image.size == (640, 420)
        text = _png_text(io.BytesIO(first[name]))
        assert text == {"Software": f"matplotlib {matplotlib.__version__}"}


def _png_text(source) -> dict[str, str]:
    with Image.open(source) as image:
        return dict(image.text)


def test_a_broken_record_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write(runs, _record())
    (runs / "efficientnet_lite0__w4a8__20260101T000000Z__00000009.json").write_text("{not json")
    assert main(["table", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "efficientnet_lite0__w4a8__20260101T000000Z__00000009.json" in err
    assert not (tmp_path / "README.md").exists()  # nothing written when a record is bad
    bad = _record()
    del bad["metrics"]["quantsim"]["top1"]
    with pytest.raises(RecordError, match="metrics.quantsim"):
        check_record(bad, f"{bad['run_id']}.json")
    with pytest.raises(RecordError, match="rename it"):
        check_record(_record(), "copy.json")


def test_table_writes_every_file_and_check_detects_stale_ones(tmp_path, capsys):
    _write(tmp_path / "runs", _record())
    assert main(["table", "--results-dir", str(tmp_path)]) == 0
    expected = render_results(tmp_path / "runs", _cards())
    assert {name: (tmp_path / name).read_bytes() for name in expected} == expected
    assert main(["table", "--check", "--results-dir", str(tmp_path)]) == 0
    _write(tmp_path / "runs", _record(stamp="20270101T000000Z", top1=50.0))
    assert main(["table", "--check", "--results-dir", str(tmp_path)]) == 1
    assert "stale" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))


_KILL_SCRIPT = """
import sys, time
from contextlib import contextmanager
from pathlib import Path
import quantlib.io as qio

real = qio.atomic_output

@contextmanager
def stalled(path):
    with real(path) as tmp:
        yield tmp
        if Path(path).name == "README.md":  # README's new text is in its temporary file: get killed now
            Path(sys.argv[2]).write_text("ready")
            time.sleep(120)

qio.atomic_output = stalled
from zoo.cli import main
main(["table", "--results-dir", sys.argv[1]])
"""


def test_a_killed_table_leaves_no_half_written_table(tmp_path):
    _write(tmp_path / "runs", _record())
    old_readme = "old README, complete\n"
    (tmp_path / "README.md").write_text(old_readme)
    marker = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), str(marker)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the table command did not reach README.md"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    expected = render_results(tmp_path / "runs", _cards())
    assert (tmp_path / "README.md").read_text() == old_readme  # untouched, not half-written
    for name, data in expected.items():
        if name != "README.md":  # written before the kill: complete
            assert (tmp_path / name).read_bytes() == data
    leftovers = list(tmp_path.glob(".README.md.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == expected["README.md"]


def test_prune_superseded_keeps_only_the_newest_record_of_each_recipe(tmp_path, capsys):
    old = _record(stamp="20260101T000000Z", top1=70.0)
    new = _record(stamp="20260102T000000Z", top1=80.0)
    other = _record(recipe="w4a8", stamp="20250101T000000Z", bits=(4, 8))
    _write(tmp_path / "runs", old, new, other)
    (tmp_path / "runs" / old["run_id"]).mkdir()
    (tmp_path / "runs" / old["run_id"] / "plot.png").write_bytes(b"png")
    shown_before = render_results(tmp_path / "runs", _cards())
    assert main(["table", "--prune-superseded", "--results-dir", str(tmp_path)]) == 0
    assert f"pruned superseded record {old['run_id']}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        [f"{new['run_id']}.json", f"{other['run_id']}.json"])
    after = render_results(tmp_path / "runs", _cards())
    assert _csv_rows(after) == _csv_rows(shown_before)  # the tables showed only the newest already
    assert main(["table", "--check", "--results-dir", str(tmp_path)]) == 0
    assert main(["table", "--prune-superseded", "--check", "--results-dir", str(tmp_path)]) == 2
    assert "--check writes nothing" in capsys.readouterr().err
