"""The fine-tuning experiment end to end on a tiny model, and the finetune / shift / trait-data commands."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from personavec.cli import main
from personavec.vectors.vector import PersonaVector

pytestmark = pytest.mark.slow  # a run plus four small fine-tunes (about a minute on 2 cores)


def test_experiment_on_a_finished_run_and_the_commands(tmp_path, model_dir, monkeypatch, capsys):
    from personavec.engine.sampling import SamplingConfig
    from personavec.finetuning.experiment import FineTuneExperiment, FTExperimentConfig
    from personavec.finetuning.lora import TrainConfig
    from personavec.run.config import RunConfig
    from personavec.run.pipeline import Run

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(trait="evil", model=str(model_dir), judge="none", eval_samples=1, steer_layers=[1],
                    steer_coefs=[1.0], sampling=SamplingConfig(n_samples=1, max_new_tokens=5, batch_size=50))
    run = Run(cfg, run_dir=tmp_path / "run", progress=False)
    run.run()
    train = TrainConfig(rank=2, lora_alpha=4, lr=1e-2, batch_size=10, grad_accum=2, warmup_steps=0, max_length=96)
    ecfg = FTExperimentConfig(percents=[0, 100], prevent_percents=[100], caft_percents=[100], prevent_coefs=[2.0],
                              train=train, eval_samples=1, max_new_tokens=4)
    other = PersonaVector.load(tmp_path / "run" / "vectors.safetensors") * -1.0
    other.trait = "kind"
    other.save(tmp_path / "kind" / "vectors.safetensors")  # a sibling run's vector for the same model
    exp = FineTuneExperiment(run, ecfg, progress=False)
    summary = exp.run_all()
    d = tmp_path / "run" / "finetune"
    # every fine-tune is also read on the sibling vector: here its negative, so the shifts are the negatives
    for m, o in summary["shift_other_traits"].items():
        assert o["kind"] == pytest.approx(-json.loads((d / m / "eval.json").read_text())["shift"], abs=1e-6)
    table = pd.read_parquet(d / "finetune.parquet")
    assert table["model"].tolist() == ["base", "mix000", "mix100", "mix100+prevent2", "mix100+caft"]
    sep = pd.read_parquet(tmp_path / "run" / "separation.parquet")  # no defensible steering choice on a tiny model:
    chosen = json.loads((tmp_path / "run" / "selection.json").read_text())["chosen_layer"]  # the best-separating one
    assert summary["n_finetunes"] == 4
    assert summary["layer"] == (chosen if chosen is not None else int(sep.loc[sep["auroc"].idxmax(), "layer"]))
    assert table.loc[0, "shift"] == 0.0  # the base model against itself
    assert table["shift"].iloc[1:].abs().min() > 0  # every fine-tune moved the last-prompt state
    assert len(table["mc_accuracy"].dropna()) == 5 and (table["n_answers"] == 20).all()
    assert (table["answer_nll"] > 0).all()  # every model's answers read by the base model
    assert math.isnan(summary["r_shift_trait"]) and -1 <= summary["r_shift_answer_projection"] <= 1  # no judge
    lo, hi = summary["r_shift_answer_projection_interval"]  # resampling the fine-tunes
    assert math.isnan(lo) or lo <= summary["r_shift_answer_projection"] <= hi
    assert [(p["percent"], p["intervention"]) for p in summary["prevention"]] == [(100, "prevent2"), (100, "caft")]
    shifts = pd.read_parquet(d / "shift.parquet")
    assert len(shifts) == 4 * 3 * 2 and set(shifts["model"]) == set(table["model"][1:])
    for name in ("finetune.png", "finetune_shift.png"):
        assert (d / name).read_bytes()[:4] == b"\x89PNG"
    trained = json.loads((d / "mix100+prevent2" / "train.json").read_text())
    (iv,) = trained["interventions"]
    assert (iv["kind"], iv["layer"], iv["coef"]) == ("preventative_steering", summary["layer"], 2.0)
    assert iv["direction_norm"] > 0
    # a second call reads everything back without training again
    stamp = (d / "mix100" / "train.json").stat().st_mtime_ns
    assert FineTuneExperiment(run, ecfg, progress=False).run_all()["n_finetunes"] == 4
    assert (d / "mix100" / "train.json").stat().st_mtime_ns == stamp
    assert len(summary["r_by_layer"]["r"]) == 3 and summary["r_by_layer"]["against"] == "answer_projection"
    with pytest.raises(Exception, match="other settings"):  # other training settings; added conditions are fine
        FineTuneExperiment(run, FTExperimentConfig(percents=[0], train=train.replace(lr=1e-3)),
                           progress=False).run_all()

    # a judge for the experiment added afterwards (--eval-judge): every stored answer judged, nothing trained or
    # generated again, the judge-free readings unchanged
    from dataclasses import replace

    from openai_server import FakeOpenAIServer

    answer_stamps = {m: (d / m / "answers.jsonl").stat().st_mtime_ns for m in table["model"]}
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with FakeOpenAIServer(responder=lambda prompt: [("70" if "how coherent" in prompt else "30", 0.0)]) as srv:
        judged_run = Run(replace(cfg, eval_judge="openai:fake-judge", eval_judge_base_url=srv.base_url),
                         run_dir=tmp_path / "run", progress=False)
        rejudged = FineTuneExperiment(judged_run, ecfg, progress=False).run_all()
        n_requests = len(srv.chat_requests)
    pairs = {(q, a) for m in table["model"] for q, a in pd.read_parquet(d / m / "answers.parquet")[["question",
                                                                                                "answer"]].values}
    assert n_requests == 1 + 2 * len(pairs)  # a preflight, then trait + coherence of each distinct answer (cached)
    assert rejudged["trait_scored"] == 4 * 20 and rejudged["judge_spec"] == "openai:fake-judge"
    assert rejudged["r_by_layer"]["against"] == "trait"
    assert (d / "mix100" / "train.json").stat().st_mtime_ns == stamp
    assert answer_stamps == {m: (d / m / "answers.jsonl").stat().st_mtime_ns for m in table["model"]}
    after = pd.read_parquet(d / "finetune.parquet")
    assert (after["trait"] == 30.0).all() and (after["coherence"] == 70.0).all()
    pd.testing.assert_series_equal(after["answer_projection"], table["answer_projection"])
    pd.testing.assert_series_equal(after["shift"], table["shift"])

    # the screening validation on the same experiment: dP-ranked selections of the 50 % mixture
    from personavec.screening.experiment import screen_validation

    sv = screen_validation(FineTuneExperiment(run, ecfg, progress=False), n=20, percent=50)
    assert [r["selection"] for r in sv["results"]] == ["top20", "random20", "bottom20", "response-top20"]
    top, rand, bottom, _ = sv["results"]
    assert 0 < rand["trait_share"] < 1  # a random draw, independent of how the mixture picked its trait rows
    assert top["mean_delta_p"] >= bottom["mean_delta_p"] and all(0 <= r["trait_share"] <= 1 for r in sv["results"])
    assert 0 <= sv["auroc_delta_p_trait_rows"] <= 1 and (d / "screen_mix050" / "screen.parquet").exists()
    lo, hi = sv["auroc_delta_p_trait_rows_interval"]  # resampling the rows
    assert lo <= sv["auroc_delta_p_trait_rows"] <= hi
    assert json.loads((d / "screen_validation.json").read_text())["n"] == 20
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Fine-tuning</h2>" in page and "mix100+prevent2" in page and "ΔP) validation" in page

    # the stand-alone commands
    assert main(["trait-data", str(tmp_path / "run"), "--out", str(tmp_path / "data"), "--percents", "50"]) == 0
    assert (tmp_path / "data" / "mix050.jsonl").exists()
    ft = ["finetune", str(tmp_path / "data" / "trait.jsonl"), "--model", str(model_dir), "--out",
          str(tmp_path / "ft"), "--vector", str(tmp_path / "run" / "vectors.safetensors"), "--prevent-coef", "2",
          "--intervention-layers", "1",  # the tiny run made no defensible steering choice: no chosen layer
          "--lr", "0.01", "--rank", "2", "--train-batch-size", "10", "--grad-accum", "2", "--warmup-steps", "0"]
    assert main([*ft, "--max-steps", "2"]) == 0
    assert "run the same command to continue" in capsys.readouterr().out
    assert main(ft) == 0
    assert "resumed from 2" in capsys.readouterr().out
    assert main(["shift", "--adapter", str(tmp_path / "ft"), "--vector", str(tmp_path / "run" / "vectors.safetensors"),
                 "--vector", str(tmp_path / "kind" / "vectors.safetensors"), "--model", str(model_dir),
                 "--out", str(tmp_path / "shift.parquet")]) == 0
    out = capsys.readouterr().out
    assert "evil: largest shift" in out and "kind: largest shift" in out and (tmp_path / "shift.png").exists()
    table = pd.read_parquet(tmp_path / "shift.parquet")
    assert len(table) == 2 * 3
    both = table.pivot(index="layer", columns="vector", values="shift")
    assert (both["evil"] + both["kind"]).abs().max() < 1e-5  # the second vector is the first one negated
    # one-line errors
    assert main(["finetune", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert main([*ft[:5], str(tmp_path / "y"), "--caft"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "need --vector" in err


def test_experiment_and_screening_use_an_http_judge_when_it_scores(tmp_path, model_dir, monkeypatch):
    """With a judge that scores (an OpenAI-compatible server on loopback), trait and coherence are judged."""
    import hashlib

    from openai_server import FakeOpenAIServer
    from personavec.engine.sampling import SamplingConfig
    from personavec.finetuning.experiment import FineTuneExperiment, FTExperimentConfig
    from personavec.finetuning.lora import TrainConfig
    from personavec.run.config import RunConfig
    from personavec.run.pipeline import Run
    from personavec.screening.experiment import screen_validation

    def judge(prompt: str) -> list[tuple[str, float]]:
        if "how coherent" in prompt:
            return [("80", 0.0)]
        return [(str(int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 101), 0.0)]

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with FakeOpenAIServer(responder=judge) as srv:
        cfg = RunConfig(trait="evil", model=str(model_dir), judge="openai:fake-judge", judge_base_url=srv.base_url,
                        eval_samples=1, filter_mode="off", steer_layers=[1], steer_coefs=[1.0],
                        sampling=SamplingConfig(n_samples=1, max_new_tokens=5, batch_size=50))
        run = Run(cfg, run_dir=tmp_path / "run", progress=False)
        run.run()
        train = TrainConfig(rank=2, lora_alpha=4, lr=1e-2, batch_size=10, grad_accum=2, warmup_steps=0,
                            max_length=96)
        ecfg = FTExperimentConfig(percents=[0, 100], prevent_percents=[100], caft_percents=[], prevent_coefs=[2.0],
                                  train=train, eval_samples=1, max_new_tokens=4, mc=False)
        exp = FineTuneExperiment(run, ecfg, progress=False)
        srv.reset()
        summary = exp.run_all()
        assert len(srv.chat_requests) > 0  # the fine-tuned models' answers went to the judge
        assert summary["trait_scored"] == 3 * 20  # every answer of the 3 fine-tunes has a trait score
        assert -1 <= summary["r_shift_trait"] <= 1 and summary["r_by_layer"]["against"] == "trait"
        (prev,) = summary["prevention"]
        assert math.isfinite(prev["trait_increase_plain"]) and math.isfinite(prev["trait_increase_with"])
        assert prev["coherence_change"] == 0.0  # the judge gives every answer coherence 80
        sv = screen_validation(FineTuneExperiment(run, ecfg, progress=False), n=20, percent=50)
    names = [r["selection"] for r in sv["results"]]
    assert names == ["top20", "random20", "bottom20", "response-top20", "judge-top20"]  # the judge-only filter
    judge_top = sv["results"][-1]
    assert judge_top["trait"] == judge_top["trait"] and judge_top["coherence"] == 80.0
