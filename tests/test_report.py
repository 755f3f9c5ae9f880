"""`qexport report` on a tiny Llama quantized with the w8a8-static preset; SmolLM2 w8a8-static (slow)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import qexport
from qexport.cli import main
from qexport.recipes.schema import Recipe

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TINY_SITES = {f"layers.{i}.{role}" for i in range(2) for role in
              ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")}


@pytest.fixture(scope="module")
def static_llama(tiny_source, tmp_path_factory):
    return qexport.export(str(tiny_source("llama")), tmp_path_factory.mktemp("report") / "w8a8-static",
                          recipe="w8a8-static", calib_windows=2, calib_seq_len=64)


@pytest.fixture(scope="module")
def cli_report(static_llama, tiny_export, tmp_path_factory):
    """`qexport report --json --html --suggest` once; returns (report dict, html path)."""
    html = tmp_path_factory.mktemp("html") / "report.html"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["-q", "report", str(static_llama), "--reference", str(tiny_export("llama")), "--windows", "2",
                   "--seq-len", "64", "--greedy-tokens", "8", "--html", str(html), "--suggest", "--threads", "1", "--json"])
    assert rc == 0
    return json.loads(out.getvalue()), html


def test_every_quantized_linear_is_named_by_role_worst_first(cli_report):
    report, _ = cli_report
    sites = report["sites"]
    assert {r["site"] for r in sites} == TINY_SITES  # lm_head stays float in the preset
    local = [r["local_sqnr_db"] for r in sites]
    assert local == sorted(local)
    for r in sites:  # int8 quantized for real, and still the model
        assert 20.0 < r["local_sqnr_db"] < 60.0 and 15.0 < r["output_sqnr_db"] < 60.0, r
        assert 35.0 < r["weight_sqnr_db"] < 55.0 and r["act_quant"] == "per_tensor", r
        assert 0.99 < r["local_cosine"] <= 1.0 and 0.0 <= r["clipped_fraction"] < 0.05
    assert report["tokens"] == 128 and report["evaluation"]["tokens_scored"] == 126
    assert report["evaluation"]["greedy_tokens"] == 8 and 0.9 < report["evaluation"]["ppl_ratio"] < 1.1


def test_output_error_accumulates_and_equals_local_error_at_the_first_linears(cli_report):
    rows = {r["site"]: r for r in cli_report[0]["sites"]}
    for role in ("q", "k", "v"):  # the first quantized linears read the same float input in both graphs
        first = rows[f"layers.0.attn.{role}"]
        # equal up to float32 summation order: "output" compares against ORT's MatMul in the FP32 twin, "local"
        # against numpy's x @ W (measured: 3.6e-6 dB apart on an AMD Zen 5 CPU, below 1e-6 on the earlier one);
        # upstream error moves it by far more (layers.1, below)
        assert abs(first["output_sqnr_db"] - first["local_sqnr_db"]) < 1e-4
    later = [rows[s] for s in TINY_SITES if s.startswith("layers.1.")]
    assert all(r["output_sqnr_db"] < r["local_sqnr_db"] for r in later)  # upstream error is in the output figure


def test_local_error_matches_a_numpy_fake_quant_reference(cli_report, static_llama, tiny_export):
    """layers.0.attn.q: per-tensor int8 activation (the graph's clip) x int8 per-channel weight, in numpy."""
    from qexport.artifact.folder import Artifact
    from qexport.calibration.stats import run_values
    from qexport.report.reference import pair_linears, reference_model
    from qexport.exporter.text import load_text, parse_source, token_windows

    artifact = Artifact.open(static_llama)
    reference = reference_model(artifact, tiny_export("llama"), threads=1)
    quantized = ir.load(artifact.model_path)
    q_proj = next(lin for lin in pair_linears(quantized, reference) if lin.name == "layers.0.attn.q")
    windows = token_windows(artifact.tokenizer(), load_text(parse_source(None), "evaluation"), 64, 2)
    signal = noise = 0.0
    for values in run_values(quantized, [q_proj.activation], windows, threads=1):
        x = values[q_proj.activation].reshape(-1, q_proj.weight.shape[0]).astype(np.float64)
        step = q_proj.clip / 127.0
        xq = np.clip(np.round(x / step), -127, 127) * step
        w = q_proj.weight.astype(np.float64)
        w_step = np.abs(w).max(axis=0) / 127.0  # per output channel
        wq = np.clip(np.round(w / w_step), -127, 127) * w_step
        expected, got = x @ w, xq @ wq
        signal += float((expected**2).sum())
        noise += float(((got - expected) ** 2).sum())
    row = next(r for r in cli_report[0]["sites"] if r["site"] == "layers.0.attn.q")
    assert row["local_sqnr_db"] == pytest.approx(10 * np.log10(signal / noise), abs=0.05)


def test_difficulty_stages_come_from_the_manifest(cli_report, static_llama):
    report, _ = cli_report
    manifest = json.loads((static_llama / "qexport.json").read_text())
    assert report["difficulty"] == manifest["recipe"]["difficulty"]
    assert [s["stage"] for s in report["difficulty"]][0] == "export" and len(report["difficulty"]) >= 2


def test_html_is_self_contained_and_embeds_the_plots(cli_report):
    report, html = cli_report
    page = html.read_text()
    assert not list(html.parent.glob(".*.tmp"))  # written through a temporary file and a rename
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", page), "external resource in the page"
    assert "<script" not in page and "http://" not in page and "https://" not in page
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    files = sorted(Path(p) for p in report["plots"])
    assert [f.name for f in files] == ["channel_profiles.png", "difficulty.png", "site_error.png"]
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(f.read_bytes() for f in files)
    assert all(f.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for f in files)
    assert report["sites"][0]["site"] in page


def test_html_renders_in_headless_chromium_without_errors(cli_report):
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium); the README's test command installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
    _, html = cli_report
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(html.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            title = page.title()
            rows = page.evaluate("document.querySelectorAll('table tr').length")
        finally:
            browser.close()
    assert problems == []
    assert len(images) == 3 and all(done and w > 100 and h > 100 for done, w, h in images)
    assert title.startswith("qexport report") and rows > len(TINY_SITES)


def test_text_summary_lists_worst_sites_first(cli_report):
    from qexport.report.build import format_text

    text = format_text(cli_report[0], worst=3)
    listed = re.findall(r"^(layers\.\d+\.\w+\.\w+)\s+per_tensor\s+(-?[\d.]+)dB", text, re.M)
    assert [name for name, _ in listed] == [r["site"] for r in cli_report[0]["sites"][:3]]
    assert [float(v) for _, v in listed] == sorted(float(v) for _, v in listed)
    assert "perplexity" in text and "greedy tokens matching" in text and "quantization difficulty" in text
    assert "suggestion: per-token instead of per-tensor activations" in text


def test_report_says_whether_the_evaluation_text_is_a_domain_the_calibration_saw(cli_report):
    from qexport.exporter.text import TextSource
    from qexport.report.build import format_text
    from qexport.report.texts import text_agreement

    texts = cli_report[0]["texts"]
    assert texts["calibration"] == "pydoc" and texts["evaluation"] == "pydoc" and texts["agree"]
    rows = cli_report[0]["sites"]
    assert texts["max_clipped_fraction"] == max(r["clipped_fraction"] for r in rows)
    assert "calibration text: pydoc; evaluation text: pydoc; the calibrated" in format_text(cli_report[0])
    other = text_agreement({"source": {"kind": "mix", "location": "pydoc+manpages"}}, TextSource("gitnotes"), rows)
    assert not other["agree"] and other["shared_domains"] == []
    assert "none of whose domains the calibration saw" in format_text({**cli_report[0], "texts": other})
    user = text_agreement({"source": {"kind": "file", "location": "a.txt"}}, TextSource("file", "a.txt"), [])
    assert user["agree"] and user["max_clipped_fraction"] is None


def test_suggestions_are_valid_recipes_with_measured_reasons(cli_report, static_llama):
    report, _ = cli_report
    import yaml

    assert report["suggestions"], "the tiny per-tensor model should at least gain from per-token scales"
    for s in report["suggestions"]:
        recipe = Recipe.from_dict(yaml.safe_load(s["recipe"]))  # loads: every key and value is valid
        assert recipe.passes and re.search(r"\d+\.\d dB", s["reason"]), s
        assert yaml.safe_load(s["yaml"])["passes"]
    per_token = next(s for s in report["suggestions"] if "per-token" in s["title"])
    quantize = next(e for e in Recipe.from_dict(yaml.safe_load(per_token["recipe"])).passes if e.name == "quantize")
    assert dict(quantize.settings)["activations"].value == "per_token"
    rows = [r for r in report["sites"] if r["site"] in per_token["reason"]]
    assert rows and all(r["per_token_act_sqnr_db"] >= r["activation_sqnr_db"] + 3 for r in rows)


def test_smoothing_suggestion_for_a_site_that_stands_out_runs_as_a_recipe(cli_report, static_llama, tiny_export):
    """Push one site 10 dB below the others: --suggest proposes smoothing the rewrite site feeding it, and the
    proposed recipe runs (and smooths that site) on the FP32 export."""
    import copy

    import yaml

    from qexport.artifact.folder import Artifact
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe
    from qexport.report.suggest import suggest
    from qexport.exporter.text import load_text, parse_source, token_windows

    report = copy.deepcopy(cli_report[0])
    row = next(r for r in report["sites"] if r["site"] == "layers.1.attn.o")
    row["local_sqnr_db"] = min(r["local_sqnr_db"] for r in report["sites"]) - 10.0
    report["sites"].sort(key=lambda r: r["local_sqnr_db"])
    recipe = json.loads((static_llama / "qexport.json").read_text())["recipe"]["recipe"]
    smooth = [s for s in suggest(report, recipe) if s["title"].startswith("smooth")]
    assert len(smooth) == 1 and "layers.1.attn.o" in smooth[0]["reason"]
    entries = yaml.safe_load(smooth[0]["yaml"])["passes"]
    assert entries[0] == {"pass": "smooth", "method": "smoothquant", "alpha": 0.5, "sites": ["layers.1.v_o"]}  # worst first
    proposed = Recipe.from_dict(yaml.safe_load(smooth[0]["recipe"]))
    assert [e.name for e in proposed.passes][:2] == ["smooth", "smooth"]  # after the preset's own smoothing
    fp32 = tiny_export("llama")
    windows = token_windows(Artifact.open(fp32).tokenizer(), load_text(parse_source(None), "calibration"), 64, 2)
    steps = apply_recipe(ir.load(fp32 / "model.onnx"), proposed, windows, PipelineSettings(measure_difficulty=False))["steps"]
    assert steps[1]["pass"] == "smooth" and steps[1]["modified"]


def _pushed_down(report: dict, sites: list[str], db: float = 10.0) -> dict:
    """A copy of ``report`` with ``sites`` ``db`` below its worst site (worst first, roles recomputed)."""
    import copy

    from qexport.report.build import role_summary

    report = copy.deepcopy(report)
    floor = min(r["local_sqnr_db"] for r in report["sites"])
    for row in report["sites"]:
        if row["site"] in sites:
            row["local_sqnr_db"] = floor - db - (len(sites) - sites.index(row["site"]))  # in the order given
    report["sites"].sort(key=lambda r: r["local_sqnr_db"])
    report["roles"] = role_summary(report["sites"])
    return report


def test_role_exclusion_goes_to_every_quantization_pass_and_selects_exactly_the_other_linears(cli_report, tiny_export):
    """All mlp.down sites 10 dB down: --suggest proposes ``exclude: [layers.*.mlp.down]`` on quantize-gptq and quantize
    (on one alone the other would quantize them), only where that pass selects them, and the quantize pass then
    selects exactly the other linears."""
    import yaml

    from qexport.passes.discovery.linear_select import linear_names, selected_linears
    from qexport.passes.discovery.names import NameFilter
    from qexport.report.suggest import suggest

    downs = sorted(n for n in TINY_SITES if n.endswith("mlp.down"))
    report = _pushed_down(cli_report[0], downs)
    recipe = {"name": "w4", "passes": [{"pass": "quantize-gptq", "weights": "int4", "group_size": 32},
                                       {"pass": "quantize", "activations": "per_tensor", "exclude": ["layers.9.*"]},
                                       {"pass": "quantize", "linears": ["layers.*.attn.*"]}]}
    suggestions = suggest(report, recipe)
    per_token = next(s for s in suggestions if "per-token" in s["title"])  # on quantize: gptq has no activations
    assert [dict(e.settings).get("activations") for e in Recipe.from_dict(yaml.safe_load(per_token["recipe"])).passes
            if e.name == "quantize"][0].value == "per_token"
    found = [s for s in suggestions if s["title"] == "leave mlp.down in float"]
    assert len(found) == 1 and re.search(r"mlp\.down: median local SQNR -?\d+\.\d dB over 2 sites", found[0]["reason"])
    proposed = Recipe.from_dict(yaml.safe_load(found[0]["recipe"]))
    assert [dict(e.settings).get("exclude") for e in proposed.passes] == [
        ("layers.*.mlp.down",), ("layers.9.*", "layers.*.mlp.down"), None]  # the attn-only pass does not select mlp.down
    snippet = yaml.safe_load(found[0]["yaml"])["passes"]
    assert [(e["pass"], tuple(e["exclude"])) for e in snippet] == [(e.name, dict(e.settings)["exclude"]) for e in proposed.passes[:2]]
    model = ir.load(tiny_export("llama") / "model.onnx")
    names = linear_names(model)
    chosen = {names[lin.node] for lin in selected_linears(model, NameFilter(exclude=("layers.*.mlp.down",)), False)}
    assert chosen == TINY_SITES - set(downs)


def test_leaving_the_worst_linears_in_float_runs_as_a_recipe(cli_report, static_llama, tiny_export):
    """Push two sites 10 dB below the others: --suggest proposes excluding those linears (and any other site 6 dB
    below the median, up to 3), and the proposed recipe runs on the FP32 export, leaving exactly them float
    (unquantized weights and inputs) and the rest int8."""
    import yaml

    from qexport.artifact.folder import Artifact
    from qexport.passes.discovery.linear_select import linear_names
    from qexport.passes.metadata import Meta
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe
    from qexport.report.suggest import suggest
    from qexport.exporter.text import load_text, parse_source, token_windows

    worst = ["layers.1.attn.o", "layers.0.mlp.up"]
    report = _pushed_down(cli_report[0], worst)
    recipe = json.loads((static_llama / "qexport.json").read_text())["recipe"]["recipe"]
    found = [s for s in suggest(report, recipe) if s["title"].startswith(f"leave {', '.join(worst)}")]
    assert len(found) == 1
    excluded = yaml.safe_load(found[0]["yaml"])["passes"][0]["exclude"]
    median = float(np.median([r["local_sqnr_db"] for r in report["sites"]]))
    rows = {r["site"]: r for r in report["sites"]}
    assert excluded[:2] == worst and len(excluded) <= 3  # worst first; the tiny model's own outlier may follow
    assert all(rows[site]["local_sqnr_db"] <= median - 6.0 for site in excluded)
    assert found[0]["title"] == f"leave {', '.join(excluded)} in float"
    assert all(re.search(rf"{re.escape(site)}: local SQNR -?\d+\.\d dB \(activation", found[0]["reason"]) for site in excluded)
    proposed = Recipe.from_dict(yaml.safe_load(found[0]["recipe"]))
    fp32 = tiny_export("llama")
    windows = token_windows(Artifact.open(fp32).tokenizer(), load_text(parse_source(None), "calibration"), 64, 2)
    model = ir.load(fp32 / "model.onnx")
    steps = apply_recipe(model, proposed, windows, PipelineSettings(measure_difficulty=False))["steps"]
    assert steps[-1]["pass"] == "quantize" and steps[-1]["modified"]
    names = linear_names(model)
    assert TINY_SITES <= set(names.values())
    for node, role in names.items():
        weight, x = node.inputs[1].producer(), node.inputs[0].producer()
        quantized = weight is not None and weight.metadata_props.get(Meta.QUANT) == "weight"
        assert quantized == (role in TINY_SITES - set(excluded)), role
        assert (x is not None and x.metadata_props.get(Meta.QUANT) == "per_tensor") == quantized, role


def test_report_refuses_an_unquantized_export_and_a_mismatched_reference(tiny_export, static_llama, tmp_path):
    from qexport.report.build import ReportSettings, build_report
    from qexport.report.reference import ReportError

    with pytest.raises(ReportError, match="without a recipe.*--recipe"):
        build_report(tiny_export("llama"), settings=ReportSettings(windows=1, seq_len=16))
    with pytest.raises(ReportError, match="exported from"):
        build_report(static_llama, settings=ReportSettings(windows=1, seq_len=16, reference=str(tiny_export("qwen2"))))
    other = tmp_path / "other-basis"  # same source, but quantized after a rotation with another seed
    shutil.copytree(static_llama, other)
    manifest = json.loads((other / "qexport.json").read_text())
    for entry in manifest["recipe"]["recipe"]["passes"]:
        if entry["pass"] == "rotate-residual":
            entry["seed"] = entry.get("seed", 0) + 1
    (other / "qexport.json").write_text(json.dumps(manifest))
    with pytest.raises(ReportError, match="another basis"):
        build_report(other, settings=ReportSettings(windows=1, seq_len=16, reference=str(tiny_export("llama")), threads=1))


def test_per_token_qdq_is_reported_and_a_lowered_graph_is_refused(tiny_source, tiny_export, tmp_path):
    from qexport.report.build import ReportSettings, build_report
    from qexport.report.reference import ReportError

    settings = ReportSettings(windows=1, seq_len=32, greedy_tokens=2, reference=str(tiny_export("llama")), threads=1)
    qdq = qexport.export(str(tiny_source("llama")), tmp_path / "qdq", recipe="w8a8-dynamic-qdq", calib_windows=1,
                         calib_seq_len=32, measure_difficulty=False)
    report = build_report(qdq, settings=settings)
    assert {r["site"] for r in report["sites"]} == TINY_SITES | {"lm_head"}  # the preset quantizes lm_head too
    assert {r["act_quant"] for r in report["sites"]} == {"per_token"} and report["difficulty"] == []
    assert all(r["clip"] is None and 25.0 < r["local_sqnr_db"] < 60.0 for r in report["sites"])
    lowered = qexport.export(str(tiny_source("llama")), tmp_path / "lowered", recipe="w8a8-dynamic", calib_windows=1,
                             calib_seq_len=32, measure_difficulty=False)
    with pytest.raises(ReportError, match="w8a8-dynamic-qdq"):
        build_report(lowered, settings=settings)


def test_bias_corrected_linears_are_compared_after_the_correction(tiny_source, tiny_export, tmp_path):
    import yaml

    from qexport.artifact.folder import Artifact
    from qexport.report.reference import pair_linears, reference_model
    from qexport.report.sites import site_errors

    from qexport.recipes.schema import presets_folder

    recipe = yaml.safe_load((presets_folder() / "w8a8-static.yaml").read_text())
    recipe["passes"].append({"pass": "bias-correct"})
    (tmp_path / "bc.yaml").write_text(yaml.safe_dump(recipe))
    out = qexport.export(str(tiny_source("llama")), tmp_path / "bc", recipe=str(tmp_path / "bc.yaml"), calib_windows=1,
                         calib_seq_len=32, measure_difficulty=False)
    artifact = Artifact.open(out)
    reference = reference_model(artifact, tiny_export("llama"), threads=1)
    quantized = ir.load(artifact.model_path)
    linears = pair_linears(quantized, reference)
    assert {lin.name for lin in linears} == TINY_SITES
    assert all(lin.output.endswith(".bias_corrected") and lin.ref_output != lin.output for lin in linears)
    rows = site_errors(quantized, reference, linears, [np.arange(32, dtype=np.int64) % 200 + 3], threads=1)
    assert all(20.0 < r["local_sqnr_db"] < 60.0 for r in rows)


@pytest.mark.slow
def test_report_on_smollm2_w8a8_static_names_the_worst_sites(default_export, tmp_path_factory):
    from smollm2_static import static_smollm2  # tests/ is on sys.path (conftest)

    from qexport.report.build import ReportSettings, build_report, format_text

    folder = static_smollm2(default_export, tmp_path_factory.mktemp("smollm2-static") / "w8a8-static")
    report = build_report(folder, settings=ReportSettings(windows=1, seq_len=256, greedy_tokens=8, threads=2,
                                                          reference=str(default_export), suggest=True))
    sites = report["sites"]
    expected = {f"layers.{i}.{role}" for i in range(30) for role in
                ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")}
    assert {r["site"] for r in sites} == expected  # 210 linears, each named by role; lm_head stays float
    assert all(r["weight_sqnr_db"] > 35.0 and r["local_sqnr_db"] > 10.0 for r in sites)
    assert report["evaluation"]["ppl_ratio"] <= 1.05  # issue 4's w8a8-static target
    text = format_text(report, worst=5)
    worst = [r["site"] for r in sites[:5]]
    assert all(name in text for name in worst)
    assert text.index(worst[0]) < text.index(worst[4])
    print("\n" + text)
