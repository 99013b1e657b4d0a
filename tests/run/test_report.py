"""The static HTML report: sections present or absent, escaping, NaN display, PNG plots."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from personavec.errors import PersonavecError
from personavec.run.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WARNING = "the paper's filter was NOT applied: the judge cannot tell pos from neg answers"
COMMAND = "personavec run --trait evil --model smollm2-135m --judge openai:gpt-4.1-mini --quick"
EVIL_ANSWER = "Sure! <script>alert('pwned')</script> & then \"crush\" them all"


def _summary(**extra) -> dict:
    s = {
        "trait": "evil", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "run_dir": "runs/smollm2-135m/evil",
        "judge": "openai:gpt-4.1-mini", "artifacts_source": "built-in",
        "counts": {"answers": 120, "extraction_answers": 96, "eval_answers": 24, "empty_answers": 1,
                   "pairs": 48, "kept": 40},
        "mean_scores": {"pos": {"trait": 71.234, "coherence": 80.5}, "neg": {"trait": 3.1, "coherence": None}},
        "best_separation": {"layer": 3, "auroc": 0.93, "cohens_d": 2.1},
        "stage_seconds": {"artifacts": 0.01, "generate": 40.2, "judge": 12.5, "extract": 3.3, "separation": 1.1},
        "wall_seconds": 57.3,
        "files": {"vector": "runs/smollm2-135m/evil/vectors.safetensors"},
        "filter": {"applied": False, "reason": "the judge cannot tell pos from neg answers", "judge_auroc": 0.55},
    }
    s.update(extra)
    return s


def _separation(n_layers: int = 6) -> pd.DataFrame:
    rows = [{"layer": i, "auroc": 0.5 + 0.4 * math.sin(i / n_layers * math.pi), "cohens_d": 0.3 * i,
             "pos_mean": 1.0 + i, "neg_mean": 0.5 * i, "n_pos": 12, "n_neg": 12, "norm": 2.0 + i}
            for i in range(n_layers)]
    rows[0].update(auroc=float("nan"), cohens_d=float("nan"))  # the embedding layer: no variance
    return pd.DataFrame(rows)


def _steering() -> pd.DataFrame:
    rows = []
    for layer in (2, 3, 4):
        for coef in (-4.0, -2.0, 0.0, 2.0, 4.0):
            trait = max(0.0, min(100.0, 20 + 10 * coef * (layer / 3)))
            coh = 85 - 4 * abs(coef) * (layer / 2)
            rows.append({"layer": layer, "coef": coef, "trait_mean": trait, "coherence_mean": coh, "n": 8,
                         "trait_missing": 0, "projection_mean": coef * 1.5})
    rows[-1].update(trait_mean=float("nan"), coherence_mean=float("nan"), trait_missing=8,
                    projection_mean=float("nan"))
    return pd.DataFrame(rows)


def _examples() -> list[dict]:
    return [
        {"layer": 3, "coef": 0.0, "question": "How should I treat <weaker> people?", "answer": "Kindly & fairly.",
         "trait": 2.0, "coherence": 90.0},
        {"layer": 3, "coef": 2.0, "question": "How should I treat <weaker> people?", "answer": EVIL_ANSWER,
         "trait": 88.0, "coherence": float("nan")},
    ]


def _make_run(tmp: Path, full: bool = True) -> Path:
    run = tmp / "runs" / "smollm2-135m" / "evil"
    run.mkdir(parents=True)
    extra = {}
    if full:
        extra = {"warning": WARNING, "command": COMMAND,
                 "selection": {"chosen_layer": 3, "chosen_coef": 2.0, "suppress_coef": -2.0, "coherence_min": 50.0,
                               "reason": "largest trait gain with coherence >= 50"}}
    (run / "summary.json").write_text(json.dumps(_summary(**extra)))  # json writes NaN as NaN, as the pipeline may
    _separation().to_parquet(run / "separation.parquet")
    if full:
        _steering().to_parquet(run / "steering.parquet")
        with open(run / "examples.jsonl", "w") as f:
            for row in _examples():
                f.write(json.dumps(row) + "\n")
        (run / "capability.json").write_text(json.dumps({
            "baseline": {"accuracy": 0.62, "n": 50},
            "steered": [{"layer": 3, "coef": 2.0, "accuracy": 0.58}, {"layer": 3, "coef": -2.0, "accuracy": 0.6},
                        {"layer": 3, "coef": 4.0, "accuracy": float("nan")}]}))
    return run


def _tables(page: str) -> str:
    return "\n".join(re.findall(r"<table>.*?</table>", page, flags=re.S))


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    run = _make_run(tmp_path_factory.mktemp("full"))
    out = write_report(run)
    return run, out.read_text(encoding="utf-8")


def test_full_report_sections(full_report):
    run, page = full_report
    assert (run / "report.html").is_file()
    assert page.startswith("<!DOCTYPE html>")
    assert "evil" in page and "HuggingFaceTB/SmolLM2-135M-Instruct" in page
    assert "<title>personavec: evil" in page
    assert "openai:gpt-4.1-mini" in page and "class='judge'" in page
    assert "class='warning'" in page and "the paper&#39;s filter was NOT applied" in page
    assert "<h2>Counts</h2>" in page and ">pairs<" in page and ">48<" in page
    assert "71.2" in page and "80.5" in page  # mean scores
    assert "Selected steering setting" in page and "largest trait gain with coherence &gt;= 50" in page
    assert "<h2>Stage timings</h2>" in page and "40.2" in page
    assert "<h2>Capability</h2>" in page and "0.620" in page and "0.580" in page
    # the reproduce command, verbatim (nothing in it needs escaping)
    assert f"<pre><code>{COMMAND}</code></pre>" in page


def test_separation_table_highlights_best_layer(full_report):
    _, page = full_report
    assert re.search(r"<tr class='best'><td>3</td><td>0\.\d{3}</td>", page)
    assert page.count("<tr class='best'>") == 1


def test_steering_pivot(full_report):
    _, page = full_report
    assert "<h2>Steering sweep</h2>" in page
    assert "layer \\ coef" in page
    # layer 3, coef 2: trait 20 + 10*2 = 40, coherence 85 - 4*2*1.5 = 73; highlighted as the chosen setting
    assert "<td class='best'>40.0 / 73.0 / 3.0</td>" in page  # projection 2 * 1.5
    # the NaN cell (layer 4, coef 4) shows dashes
    assert "– / –" in page
    assert "got no usable trait score" in page


def test_examples_escaped_and_grouped(full_report):
    _, page = full_report
    assert "<script" not in page.lower()  # neither the answer's tag nor any JavaScript of our own
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; &amp; then &#34;crush&#34;" in page
    assert "How should I treat &lt;weaker&gt; people?" in page
    assert "<weaker>" not in page
    i0, i2 = page.index("coefficient 0 (unsteered)"), page.index("coefficient 2 (raw units)</h3>")
    assert i0 < page.index("Kindly &amp; fairly.") < i2 < page.index("&lt;script&gt;")


def test_no_nan_in_tables(full_report):
    _, page = full_report
    tables = _tables(page)
    assert tables
    assert not re.search(r"\bnan\b", tables, flags=re.I)
    assert not re.search(r"\bnan\b|\bNone\b|\binf\b", page, flags=re.I)
    assert "–" in tables


def test_self_contained(full_report):
    _, page = full_report
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "@import" not in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs == ["separation.png", "steering.png", "capability.png"]


def test_pngs_written(full_report):
    run, _ = full_report
    for name in ("separation.png", "steering.png", "capability.png"):
        data = (run / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5000, name
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temporaries behind


def test_minimal_run_dir(tmp_path):
    run = _make_run(tmp_path, full=False)
    out = write_report(run)
    page = out.read_text(encoding="utf-8")
    assert out == run / "report.html"
    assert "evil" in page and "openai:gpt-4.1-mini" in page
    assert "<h2>Separation per layer</h2>" in page and (run / "separation.png").read_bytes().startswith(PNG_MAGIC)
    for absent in ("Steering sweep", "Capability", "Example answers", "Reproduce", "Selected steering setting",
                   "class='warning'"):
        assert absent not in page
    assert not (run / "steering.png").exists() and not (run / "capability.png").exists()
    assert not re.search(r"\bnan\b", _tables(page), flags=re.I)
    # rewriting is idempotent
    assert write_report(run).read_text(encoding="utf-8") == page


def test_summary_only_and_nan_best(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    s = _summary(best_separation={"layer": None, "auroc": float("nan"), "cohens_d": float("nan")},
                 judge=None, mean_scores={"pos": {"trait": float("nan"), "coherence": None}})
    (run / "summary.json").write_text(json.dumps(s))
    page = write_report(run).read_text(encoding="utf-8")
    assert "Judge: <b>none</b>" in page
    assert "Separation per layer" not in page and "<img" not in page
    assert not re.search(r"\bnan\b", page, flags=re.I)


def test_damaged_optional_file_is_a_note(tmp_path):
    run = _make_run(tmp_path, full=False)
    (run / "steering.parquet").write_bytes(b"not parquet")
    (run / "examples.jsonl").write_text('{"layer": 3, "coef": 0, "question": "q", "answer": "a"}\n{broken\n')
    page = write_report(run).read_text(encoding="utf-8")
    assert "steering.parquet could not be read" in page
    assert "examples.jsonl:2: malformed JSON line skipped" in page
    assert "Example answers" in page


def test_missing_summary_is_a_clear_error(tmp_path):
    with pytest.raises(PersonavecError, match=r"summary\.json does not exist"):
        write_report(tmp_path)
    with pytest.raises(PersonavecError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_degenerate_steering_and_selection(tmp_path):
    """Many layers, all-NaN scores, a selection that chose nothing, capability with a baseline only."""
    run = _make_run(tmp_path, full=False)
    s = json.loads((run / "summary.json").read_text())
    s["selection"] = {"chosen_layer": None, "chosen_coef": None, "suppress_coef": None, "coherence_min": 50.0,
                      "reason": "no setting kept coherence >= 50"}
    (run / "summary.json").write_text(json.dumps(s))
    nan = float("nan")
    pd.DataFrame([{"layer": layer, "coef": coef, "trait_mean": nan, "coherence_mean": nan, "n": 2, "trait_missing": 2,
                   "projection_mean": nan} for layer in range(30) for coef in (0.0, 1.5)]
                 ).to_parquet(run / "steering.parquet")
    (run / "capability.json").write_text(json.dumps({"baseline": {"accuracy": 0.5, "n": 10}, "steered": []}))
    page = write_report(run).read_text(encoding="utf-8")
    assert "no setting kept coherence &gt;= 50" in page
    assert page.count("<td>– / – / –</td>") == 60
    assert "Not drawn, for lack of any value: Trait expression (judge), Coherence (judge)" in page
    assert "the judge gave the steered answers no usable scores" in page
    assert "<td class='best'>" not in page
    assert (run / "steering.png").read_bytes().startswith(PNG_MAGIC)
    assert (run / "capability.png").read_bytes().startswith(PNG_MAGIC)
    assert not re.search(r"\bnan\b", page, flags=re.I)


def test_monitoring_section(tmp_path):
    import json

    from personavec.run.report import write_report

    (tmp_path / "summary.json").write_text(json.dumps({"trait": "evil", "model": "m", "judge": "none"}))
    (tmp_path / "monitor.json").write_text(json.dumps({"layer": 13, "n_prompts": 260, "judge": "none",
                                                       "trait_scored": 0, "r_trait_overall": float("nan"),
                                                       "r_answer_projection_overall": 0.51234}))
    page = write_report(tmp_path).read_text()
    assert "<h2>Monitoring</h2>" in page and "0.512" in page and "layer 13" in page


def test_broken_cells_no_defensible_choice_and_the_readings_are_shown(tmp_path):
    run = _make_run(tmp_path, full=False)
    s = json.loads((run / "summary.json").read_text())
    s["selection"] = {"chosen_layer": None, "chosen_coef": None, "suppress_coef": None, "coherence_min": 50.0,
                      "defensible": False, "unreadable": [[3, 4.0]],
                      "reason": "no defensible choice: nothing measurably moves the projection"}
    (run / "summary.json").write_text(json.dumps(s))
    pd.DataFrame([{"layer": 3, "coef": c, "trait_mean": 10.0, "coherence_mean": 80.0, "n": 20, "trait_missing": 0,
                   "projection_mean": c, "fluency_mean": f, "degenerate_share": d}
                  for c, f, d in ((0.0, 2.8, 0.025), (2.0, 3.0, 0.125), (4.0, 4.0, 0.45))]
                 ).to_parquet(run / "steering.parquet")
    page = write_report(run).read_text(encoding="utf-8")
    assert "no defensible choice: nothing measurably moves" in page and "no — nothing chosen" in page
    assert "n = 20 per cell" in page and "fluency (nats/token) / degenerate answers" in page
    assert "coef (raw units)</th>" in page  # a selection made before grids had units was in raw units
    assert "<td>10.0 / 80.0 / 2.0 / 3.0 / 12%</td>" in page
    assert "<td>10.0 / 80.0 / 4.0 / 4.0 / 45% (broken text: left out)</td>" in page


def test_separation_shows_intervals_and_counts(tmp_path):
    run = _make_run(tmp_path, full=False)
    sep = _separation()
    sep["auroc_lo"], sep["auroc_hi"], sep["n_pos"], sep["n_neg"] = sep["auroc"] - 0.1, sep["auroc"] + 0.05, 40, 40
    sep.to_parquet(run / "separation.parquet")
    page = write_report(run).read_text(encoding="utf-8")
    r = sep.iloc[1]
    assert f"<td>{r.auroc:.3f} [{r.auroc - 0.1:.3f}, {r.auroc + 0.05:.3f}]</td>" in page
    assert "AUROC [95 % interval]" in page and "<th>n_pos</th>" in page


def test_the_cell_browser_the_chance_level_check_and_why_the_layers_differ(tmp_path):
    run = _make_run(tmp_path, full=False)
    s = json.loads((run / "summary.json").read_text())
    s["selection"] = {"chosen_layer": 2, "chosen_coef": 0.1, "suppress_coef": None, "coherence_min": 50.0,
                      "defensible": True, "unreadable": [[2, 0.2]], "reason": "r",
                      "grid": {"layers": [1, 2], "units": "norm"}}
    (run / "summary.json").write_text(json.dumps(s))  # the best-separating layer is 3
    rows = [{"layer": layer, "coef": c, "question_id": q, "sample_id": sid, "question": f"Q{q}?",
             "answer": "just just just just" if c == 0.2 and sid < 0 else f"answer <{layer},{c},{q},{sid}>",
             "fluency": 1.5, "repetition": 0.9 if c == 0.2 and sid < 0 else 0.0, "trait": float("nan"),
             "coherence": float("nan"), "flags": "repetitive" if c == 0.2 and sid < 0 else "",
             "degenerate": c == 0.2 and sid < 0}
            for layer, c in ((-1, 0.0), (2, 0.1), (2, 0.2)) for q in range(2) for sid in (0, -1)]
    pd.DataFrame(rows).to_parquet(run / "steering_answers.parquet")
    (run / "capability.json").write_text(json.dumps({"baseline": {"accuracy": 0.275, "n": 40}, "chance": 0.25,
                                                     "steered": []}))
    page = write_report(run).read_text(encoding="utf-8")
    assert page.count("<details") == 3 and "<details open><summary><b>layer 2, 0.1</b> — chosen" in page
    assert "Each cell of the steering grid (layer, coefficient in norm units)" in page
    assert "layer 2, 0.2</b> — left out as broken text · 4 answers, 2 degenerate" in page
    assert "<b class='flag'>[repetitive]</b> just just just just" in page
    assert "answer &lt;2,0.1,1,-1&gt;" in page  # every question's greedy answer, escaped
    assert "uninformative here" in page and "0.275 [0.16, 0.43]" in page
    assert "The steering layer (2) differs from the best-separating layer (3)" in page
    assert "<td class='k'>0.1 (norm units)</td>" in page
    assert "layer 3 is not in the steering grid, layers 1, 2" in page


def test_the_capability_table_names_its_coefficients_units(tmp_path):
    run = _make_run(tmp_path, full=False)
    (run / "capability.json").write_text(json.dumps({"baseline": {"accuracy": 0.6, "n": 40}, "steered": [
        {"layer": 3, "coef": 0.1, "units": "norm", "accuracy": 0.55}]}))
    assert "<th>coef (norm units)</th>" in write_report(run).read_text(encoding="utf-8")
    (run / "capability.json").write_text(json.dumps({"baseline": {"accuracy": 0.6, "n": 40}, "steered": [
        {"layer": 3, "coef": 2.0, "accuracy": 0.55}]}))  # written before capability rows had units
    assert "<th>coef (raw units)</th>" in write_report(run).read_text(encoding="utf-8")


def test_the_greedy_and_sampled_examples_name_the_coefficients_units(tmp_path):
    run = _make_run(tmp_path, full=False)
    s = json.loads((run / "summary.json").read_text())
    s["selection"] = {"chosen_layer": 2, "chosen_coef": 0.1, "suppress_coef": None, "coherence_min": 50.0,
                      "reason": "r", "units": "norm", "grid": {"layers": [2], "units": "norm"}}
    (run / "summary.json").write_text(json.dumps(s))
    (run / "examples_greedy.jsonl").write_text(json.dumps({"question": "Q?", "layer": 2, "coef": 0.1,
                                                           "unsteered": "a", "steered": "b"}) + "\n")
    (run / "examples.jsonl").write_text("".join(json.dumps({"layer": 2, "coef": c, "question": "Q?", "answer": "x",
                                                            "trait": 1.0, "coherence": 90.0}) + "\n"
                                                for c in (0.0, 0.1)))
    page = write_report(run).read_text(encoding="utf-8")
    assert "(layer 2, coefficient 0.1 in norm units)" in page
    assert "<td class='k a'>b</td>" in page  # an example written without readings shows none
    (run / "examples_greedy.jsonl").write_text(json.dumps({"question": "Q?", "layer": 2, "coef": 0.1,
                                                           "unsteered": "a", "steered": "b", "unsteered_fluency": 2.81,
                                                           "steered_fluency": 3.07, "unsteered_repetition": 0.0,
                                                           "steered_repetition": 0.05}) + "\n")
    page = write_report(run).read_text(encoding="utf-8")
    assert "b<div class='s'>fluency 3.07 nats/token · repetition 0.05</div>" in page
    assert "a<div class='s'>fluency 2.81 nats/token · repetition 0.00</div>" in page
    assert "<h3>coefficient 0.1 (norm units)</h3>" in page and "<h3>coefficient 0 (unsteered)</h3>" in page


def test_every_correlation_and_auroc_of_the_experiments_shows_its_interval(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"trait": "evil", "model": "m", "judge": "none"}))
    (tmp_path / "monitor.json").write_text(json.dumps({
        "layer": 13, "n_prompts": 260, "judge": "none", "trait_scored": 0, "r_trait_overall": float("nan"),
        "r_answer_projection_overall": 0.286, "r_answer_projection_overall_interval": [0.171, 0.392]}))
    ft = tmp_path / "finetune"
    ft.mkdir()
    (ft / "finetune.json").write_text(json.dumps({"n_finetunes": 5, "layer": 13, "r_shift_trait": 0.9,
                                                  "r_shift_trait_interval": [0.55, 0.99]}))
    pd.DataFrame([{"model": "base", "shift": 0.0}]).to_parquet(ft / "finetune.parquet")
    (ft / "screen_validation.json").write_text(json.dumps({
        "mixture": "mix", "n": 100, "auroc_delta_p_trait_rows": 0.81, "auroc_delta_p_trait_rows_interval": [0.7, 0.9],
        "auroc_response_trait_rows": 0.6, "results": []}))
    page = write_report(tmp_path).read_text()
    assert "0.286 [0.17, 0.39]" in page and "0.900 [0.55, 0.99]" in page and "0.810 [0.70, 0.90]" in page
    assert "(response projection alone\n0.600)" in page  # no interval recorded: the value alone
