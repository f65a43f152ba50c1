"""The SDE gallery: docs/zoo.md, its plots and results.json, and the script that builds them.

The page must describe every gallery SDE, and every SDE must have been built: a plot, a results.json
row without error and with a finite NLL, and the page's table must be the one results.json renders.
The pipeline itself runs end to end on one SDE with a tiny budget (its numbers mean nothing then).
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "zoo.md"
ZOO = ROOT / "docs" / "zoo"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_build():
    spec = importlib.util.spec_from_file_location("zoo_build", ZOO / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there while the file runs
    spec.loader.exec_module(module)
    return module


build = _load_build()
TINY = ["--steps", "20", "--nll-points", "32", "--samples", "64", "--sample-steps", "20", "--check-paths", "1024"]


def _results() -> dict:
    return json.loads((ZOO / "results.json").read_text(encoding="utf-8"))


def test_the_gallery_has_six_sdes_beyond_the_baselines():
    assert set(build.BASELINES) <= set(build.GALLERY)
    assert len(set(build.GALLERY) - set(build.BASELINES)) >= 6
    for name in build.GALLERY:
        assert (ROOT / "examples" / f"{name}.sde").is_file(), name


@pytest.mark.parametrize("name", build.GALLERY)
def test_the_page_has_a_section_per_sde(name):
    headings = re.findall(r"^#+ .*$", PAGE.read_text(encoding="utf-8"), re.M)
    assert any(f"`{name}`" in h for h in headings), f"docs/zoo.md has no heading naming `{name}`"
    assert f"zoo/{name}.png" in PAGE.read_text(encoding="utf-8"), "the page shows the SDE's plot"


@pytest.mark.parametrize("name", build.GALLERY)
def test_every_sde_was_built(name):
    row = _results()["rows"][name]
    assert "error" not in row, row.get("error")
    assert row["check"]["passed"], row["check"]["failures"]
    assert math.isfinite(row["nll"]["nats"]) and math.isfinite(row["nll"]["bpd"])
    assert [s["method"] for s in row["samples"]] == ["em", "splitting" if row["kind"] == "coupled" else "ode"]
    assert row["plot"] == f"{name}.png" and (ZOO / row["plot"]).read_bytes()[:8] == PNG_SIGNATURE


def test_the_gallery_was_built_with_the_default_budget():
    assert _results()["protocol"] == asdict(build.Protocol())


def test_the_page_table_is_the_one_results_json_renders():
    text, begin, end = build.table_span(PAGE)
    assert text[begin:end] == "\n" + build.render_table(_results())


def test_pipeline_end_to_end(tmp_path):
    """One SDE through every stage with a tiny budget, in float64 (the gallery itself is float32): the
    plot, the row and the page's table are written; the page outside its markers is left alone."""
    page = tmp_path / "zoo.md"
    page.write_text(f"# before\n{build.START}\nold table\n{build.END}\nafter\n", encoding="utf-8")
    assert build.main(TINY + ["--dtype", "float64", "--only", "ve", "--out", str(tmp_path), "--doc", str(page)]) == 0
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert list(results["rows"]) == ["ve"] and results["protocol"]["dtype"] == "float64"
    row = results["rows"]["ve"]
    assert row["kind"] == "affine" and row["kernel"] == "closed form" and row["check"]["passed"]
    assert math.isfinite(row["nll"]["nats"]) and row["nll"]["n"] == 32
    assert {s["method"] for s in row["samples"]} == {"em", "ode"}
    assert (tmp_path / "ve.png").read_bytes()[:8] == PNG_SIGNATURE
    text = page.read_text(encoding="utf-8")
    assert text == f"# before\n{build.START}\n{build.render_table(results)}{build.END}\nafter\n"


@pytest.mark.cuda
def test_pipeline_on_cuda(tmp_path):
    page = tmp_path / "zoo.md"
    page.write_text(f"{build.START}\n{build.END}\n", encoding="utf-8")
    assert build.main(TINY + ["--device", "cuda", "--only", "cld", "--out", str(tmp_path), "--doc", str(page)]) == 0
    row = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["rows"]["cld"]
    assert "error" not in row and math.isfinite(row["nll"]["nats"])


def _row(name: str, nats: float = 1.5) -> dict:
    """A results.json row as build_one writes it, with made-up numbers."""
    check = dict(passed=True, counts={"ok": 3, "warn": 0, "n/a": 1, "FAIL": 0}, warnings=[], failures=[],
                 kl_prior_nats=0.0, kl_simulated=False, check_s=0.1)
    samples = [dict(method="em", steps=10, nfe=11, seconds=0.1, non_finite=0, outside=0, mmd=0.0, p_value=0.5),
               dict(method="ode", steps=None, nfe=50, seconds=0.1, non_finite=2, outside=3, mmd=0.0, p_value=0.25)]
    return dict(name=name, kind="affine", kernel="closed form", baseline=False, check=check, train_s=1.0,
                nll=dict(nats=nats, stderr=0.1, bpd=nats / (2 * math.log(2)), nfe=100, upper_bound=False),
                samples=samples, plot=f"{name}.png")


def test_only_replaces_its_rows_and_keeps_the_others():
    protocol = build.Protocol()
    previous = build.merge(None, protocol, [_row("vp", 1.4), _row("cld", 1.9)], {"nll_nats": 2.6, "nll_stderr": 0.1})
    merged = build.merge(previous, protocol, [_row("vp", 1.3)], {"nll_nats": 2.6, "nll_stderr": 0.1})
    assert merged["rows"]["vp"]["nll"]["nats"] == 1.3 and merged["rows"]["cld"]["nll"]["nats"] == 1.9
    assert merged["protocol"] == asdict(protocol)


def test_rows_of_another_protocol_are_refused(tmp_path):
    previous = build.merge(None, build.Protocol(steps=20), [_row("vp")], {"nll_nats": 2.6, "nll_stderr": 0.1})
    with pytest.raises(ValueError, match="another protocol"):
        build.merge(previous, build.Protocol(steps=1500), [_row("cld")], {})
    # and from the command line, before any training: exit status 2 and the message
    (tmp_path / "results.json").write_text(json.dumps(previous), encoding="utf-8")
    page = tmp_path / "zoo.md"
    page.write_text(f"{build.START}\n{build.END}\n", encoding="utf-8")
    assert build.main(["--only", "cld", "--out", str(tmp_path), "--doc", str(page)]) == 2
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8")) == previous


def test_a_page_without_markers_is_refused_before_training(tmp_path, capsys):
    page = tmp_path / "zoo.md"
    page.write_text("# no table here\n", encoding="utf-8")
    assert build.main(["--only", "vp", "--out", str(tmp_path), "--doc", str(page)]) == 2
    assert build.START in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_the_table_marks_failures_bounds_and_lost_samples():
    rows = [_row("vp"), dict(_row("cld"), kind="coupled"), dict(name="ou", error="SolverError: too stiff")]
    rows[1]["nll"] = dict(rows[1]["nll"], upper_bound=True)
    results = build.merge(None, build.Protocol(), rows, {"nll_nats": 2.6, "nll_stderr": 0.1})
    lines = build.render_table(results).splitlines()
    vp, ou, cld = (next(line for line in lines if line.startswith(f"| `{n}`")) for n in ("vp", "ou", "cld"))
    assert lines.index(vp) < lines.index(ou) < lines.index(cld)       # gallery order
    assert "1.50 ± 0.10 |" in vp and "1.50 ± 0.10 (b)" in cld          # (b): the coupled upper bound
    assert "| 0.50 | 0.25, 3 far, 2 non-finite (ode) |" in vp
    assert "**failed**: SolverError: too stiff" in ou
