"""The resumable pipeline: a run killed between stages or mid-stage finishes with identical outputs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from openai_server import FakeOpenAIServer
from personavec.judge.spec import PREFLIGHT_PROMPT
from personavec.vectors.vector import PersonaVector

pytestmark = pytest.mark.slow  # subprocess runs of the whole pipeline (about a minute each on 2 cores)


def judged_calls(srv) -> int:
    """Judge requests, not counting the one-token reachability check each fresh judge stage makes, nor a request whose
    body never arrived whole (the client was killed while sending it; the server answered 400 to nobody)."""
    return sum(1 for r in srv.chat_requests
               if isinstance(r.body, dict) and r.body["messages"][-1]["content"] != PREFLIGHT_PROMPT)


def deterministic_judge(prompt: str) -> list[tuple[str, float]]:
    """Coherence prompts score 90; trait prompts get a score fixed by a hash of the prompt."""
    if "how coherent" in prompt:
        return [("90", 0.0)]
    k = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 101
    return [(str(k), 0.0)]


def _cmd(model_dir: Path, run_dir: Path, base_url: str) -> list[str]:
    return [sys.executable, "-m", "personavec.cli", "run", "--trait", "evil", "--model", str(model_dir),
            "--judge", "openai:fake-judge", "--judge-base-url", base_url, "--judge-concurrency", "2",
            "--n-samples", "1", "--max-new-tokens", "12", "--temperature", "1.0", "--gen-batch-size", "1",
            "--filter", "on", "--steer-layers", "1,2", "--steer-coefs=-1,1", "--run-dir", str(run_dir),
            "--dtype", "float32"]  # one row at a time: a resumed run's batches differ, and the matrix kernels may
    # round another batch shape differently in the last bit (a sampled token then flips), so what is tested here is
    # the resume, not batch invariance


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PERSONAVEC_CACHE": str(cache), "OPENAI_API_KEY": "test", "HF_HUB_OFFLINE": "1"}


def _kill_when(cmd, env, condition, timeout=120.0) -> bool:
    """Start cmd, SIGKILL it as soon as condition() holds; True if it was killed before finishing."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.wait()
    return False


def _lines(p: Path) -> int:
    return sum(1 for _ in open(p)) if p.exists() else 0


def _outputs(run_dir: Path):
    judged = pd.read_parquet(run_dir / "judged.parquet")
    vec = PersonaVector.load(run_dir / "vectors.safetensors")
    sep = pd.read_parquet(run_dir / "separation.parquet")
    return judged, vec, sep


MILESTONES = ("run.json", "artifacts.json", "responses.jsonl", "responses.parquet", "judged.parquet",
              "vectors.safetensors", "separation.parquet", "steering_answers.parquet", "selection.json",
              "capability.json", "summary.json")


def _progress(run_dir: Path, srv) -> tuple:
    """How far a run has come: each stage's output, sampling in steps of 100 answers, judging in steps of 150
    calls, and the steered answers in steps of 30."""
    return (tuple(m for m in MILESTONES if (run_dir / m).exists()), _lines(run_dir / "responses.jsonl") // 100,
            judged_calls(srv) // 150, _lines(run_dir / "steer" / "answers.jsonl") // 30)


def test_killed_at_every_stage_or_interrupted_the_run_resumes_with_identical_outputs(tmp_path, model_dir):
    with FakeOpenAIServer(responder=deterministic_judge, delay=0.005) as srv:
        ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
        cache_ref, cache_run = tmp_path / "cache-ref", tmp_path / "cache-run"
        done = subprocess.run(_cmd(model_dir, ref_dir, srv.base_url), env=_env(cache_ref), capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        calls_ref = judged_calls(srv)
        # trait + coherence for every extraction answer and every steered answer (1 baseline + 2x2 cells) x 20
        # questions x (a sampled and a greedy answer), less the prompts that repeat (identical answers are judged once)
        assert 2 * 200 < calls_ref <= 2 * 200 + 2 * 5 * 20 * 2

        cmd, env = _cmd(model_dir, run_dir, srv.base_url), _env(cache_run)
        jsonl = run_dir / "responses.jsonl"
        # Ctrl-C in the middle of sampling: exit 130 with one line, nothing half-written
        srv.reset()
        # Ctrl-C must reach the run even when these tests run in a background job (which ignores SIGINT, and a
        # child inherits that)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while _lines(jsonl) < 16 and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        assert "personavec: interrupted (run the same command again to continue)" in proc.stderr.read().splitlines()
        assert not (run_dir / "responses.parquet").exists()
        calls_resumed, kills = judged_calls(srv), 0
        # SIGKILL as soon as the run shows progress (a stage's output, 100 more answers, 150 more judge calls, 30 more
        # steered answers), again and again: every stage is cut right after its start and in its middle
        while True:
            srv.reset()
            start = _progress(run_dir, srv)
            killed = _kill_when(cmd, env, lambda start=start: _progress(run_dir, srv) != start)
            calls_resumed += judged_calls(srv)
            if not killed:
                break
            kills += 1
            assert kills < 80
        assert (run_dir / "summary.json").exists() and kills >= 15

    # no judge call was repeated beyond those in flight at a kill (concurrency 2)
    assert calls_resumed <= calls_ref + 2 * kills
    # every job answered exactly once, here and in the steering grid (1 baseline + 2 x 2 cells, 20 questions each,
    # sampled and greedy)
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert sorted(r["job"] for r in rows) == list(range(280))  # 2 sides x (100 extraction + 40 held-out)
    steered = [json.loads(x)["job"] for x in (run_dir / "steer" / "answers.jsonl").read_text().splitlines()]
    assert sorted(steered) == list(range(5 * 20 * 2))
    j_ref, v_ref, s_ref = _outputs(ref_dir)
    j_run, v_run, s_run = _outputs(run_dir)
    pd.testing.assert_frame_equal(j_ref.drop(columns=["judge"]), j_run.drop(columns=["judge"]))
    for p in v_ref.tensors:
        assert torch.equal(v_ref.tensors[p], v_run.tensors[p])
    pd.testing.assert_frame_equal(s_ref, s_run)
    pd.testing.assert_frame_equal(pd.read_parquet(ref_dir / "steering.parquet"),
                                  pd.read_parquet(run_dir / "steering.parquet"))
    assert json.loads((ref_dir / "selection.json").read_text()) == json.loads((run_dir / "selection.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["judge"].startswith("openai:fake-judge@") and summary["counts"]["kept"] > 0
    html = (run_dir / "report.html").read_text()
    assert "fake-judge" in html and summary["command"].startswith("personavec run --trait evil")
    assert (run_dir / "steering.png").exists() and (run_dir / "separation.png").exists()
    assert not [p.name for p in run_dir.rglob("*") if ".tmp" in p.name]  # no temporary file left by any kill


def test_rerun_of_a_finished_run_does_nothing_and_other_settings_are_refused(tmp_path, model_dir):
    with FakeOpenAIServer(responder=deterministic_judge) as srv:
        run_dir = tmp_path / "run"
        cmd, env = _cmd(model_dir, run_dir, srv.base_url), _env(tmp_path / "cache")
        assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
        first = (run_dir / "vectors.safetensors").stat().st_mtime_ns
        srv.reset()
        assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
        assert len(srv.chat_requests) == 0
        assert (run_dir / "vectors.safetensors").stat().st_mtime_ns == first
        other = subprocess.run([*cmd, "--seed", "1"], env=env, capture_output=True, text=True)
        assert other.returncode == 2 and "other settings" in other.stderr
        assert len(other.stderr.strip().splitlines()) == 1


def test_filter_auto_uses_the_judge_only_when_it_separates_pos_from_neg(tmp_path):
    from personavec.run.config import RunConfig
    from personavec.run.pipeline import Run

    def frames(pos_scores, neg_scores):
        n = len(pos_scores)
        base = {"answer": ["a"] * n, "coherence": [90.0] * n}
        return pd.DataFrame({**base, "trait": pos_scores}), pd.DataFrame({**base, "trait": neg_scores})

    run = Run(RunConfig(trait="evil", judge="openai:x"), run_dir=tmp_path)
    good = run.filter_decision(*frames([80.0] * 12, [10.0] * 12))
    assert good["applied"] and good["judge_auroc"] == 1.0 and good["paper_filter_keeps"] == 12
    noise = run.filter_decision(*frames([30.0, 60.0] * 6, [60.0, 30.0] * 6))
    assert not noise["applied"] and "cannot tell" in noise["reason"]
    few = run.filter_decision(*frames([80.0] * 5 + [40.0] * 7, [10.0] * 12))
    assert not few["applied"] and "keeps only 5" in few["reason"]
    missing = run.filter_decision(*frames([None] * 12, [None] * 12))
    assert not missing["applied"] and missing["judge_missing"] == 24 and "only 0 pos" in missing["reason"]
    one = run.filter_decision(*frames([90.0] + [None] * 11, [10.0] + [None] * 11))
    assert not one["applied"] and "only 1 pos and 1 neg" in one["reason"]
    run.cfg.filter_mode = "on"
    assert run.filter_decision(*frames([30.0, 60.0] * 6, [60.0, 30.0] * 6))["applied"]
    run.cfg.judge = "none"
    assert not run.filter_decision(*frames([80.0] * 12, [10.0] * 12))["applied"]


def test_unknown_trait_and_unreachable_judge_are_one_line_errors(tmp_path, model_dir):
    env = _env(tmp_path / "cache")
    cmd = [sys.executable, "-m", "personavec.cli", "run", "--trait", "grumpy", "--model", str(model_dir),
           "--run-dir", str(tmp_path / "r1")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown trait 'grumpy'" in r.stderr and "Traceback" not in r.stderr
    cmd = _cmd(model_dir, tmp_path / "r2", "http://127.0.0.1:9/v1")
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert time.time() - t0 < 60  # found out before any generation
    assert r.returncode == 2 and "unreachable" in r.stderr and "Traceback" not in r.stderr


def test_judge_none_runs_in_process_and_warns(tmp_path, model_dir, monkeypatch):
    from personavec.engine.sampling import SamplingConfig
    from personavec.run.config import RunConfig
    from personavec.run.pipeline import Run

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(trait="humorous", model=str(model_dir), judge="none", eval_samples=1, steer_layers=[2],
                    steer_coefs=[1.0],
                    sampling=SamplingConfig(n_samples=1, max_new_tokens=6, batch_size=50))
    summary = Run(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert "NOT applied" in summary["warning"] and "--judge none" in summary["warning"]
    assert summary["judge"] == "none" and summary["counts"]["extraction_answers"] == 200
    judged = pd.read_parquet(tmp_path / "run" / "judged.parquet")
    assert judged["trait"].isna().all()
    vec = PersonaVector.load(tmp_path / "run" / "vectors.safetensors")
    assert vec.trait == "humorous" and vec.filter["applied"] is False and vec.extra["judge"] == "none"
    sep = pd.read_parquet(tmp_path / "run" / "separation.parquet")
    assert list(sep["layer"]) == [0, 1, 2] and sep["auroc"].between(0, 1).all()
    # 95 % bootstrap intervals over the 20 evaluation questions hold the point estimates
    real = sep["layer"] > 0  # layer 0's row is the embeddings' (no interval where all projections tie)
    assert (sep.loc[real, "auroc_lo"] <= sep.loc[real, "auroc"]).all()
    assert (sep.loc[real, "auroc"] <= sep.loc[real, "auroc_hi"]).all()
    assert (sep.loc[real, "cohens_d_lo"] < sep.loc[real, "cohens_d_hi"]).all() and (sep["n_questions"] == 20).all()
    # no judge: the projection of the steered answers decides; on a tiny random model coefficient 1 either breaks
    # its text (more of its six-token answers loop than unsteered: the readability gate leaves the cell out) or
    # moves the projection by less than its interval, so nothing is chosen, and the summary, selection and vector
    # say so
    sel = summary["selection"]
    assert sel["chosen_layer"] is None and sel["reason"].startswith("no defensible choice: ")
    broken = sel["unreadable"] == [[2, 1.0]]
    assert ("every steered cell (1) reads as broken text" if broken else "nothing measurably moves") in sel["reason"]
    assert json.loads((tmp_path / "run" / "selection.json").read_text())["criterion"] == "projection_gap_units"
    vec = PersonaVector.load(tmp_path / "run" / "vectors.safetensors")
    assert vec.chosen_layer is None and vec.extra["selection"]["defensible"] is False
    steering = pd.read_parquet(tmp_path / "run" / "steering.parquet")
    assert sorted(steering["coef"]) == [0.0, 1.0] and steering["trait_mean"].isna().all()
    assert (steering["n"] == 20).all() and steering["fluency_mean"].notna().all()
    assert broken or steering.loc[steering["coef"] == 1.0, "projection_effect_lo"].item() <= 0
    cap = summary["capability"]  # the unsteered check still runs; with no chosen layer nothing is steered
    assert cap["baseline"]["n"] == 40 and cap["steered"] == []
    assert (tmp_path / "run" / "report.html").exists()


def test_local_generator_answers_a_chat(model_dir):
    from personavec.run.writers import make_generator

    gen = make_generator(f"local:{model_dir}", device="cpu")
    gen.max_new_tokens = 5
    assert isinstance(gen.complete([{"role": "user", "content": "Write JSON."}]), str)
    assert gen.name.startswith("local:")


def test_monitor_experiment_on_a_finished_run(tmp_path, model_dir, monkeypatch):
    import math

    from personavec.engine.sampling import SamplingConfig
    from personavec.monitor.experiment import monitor_run
    from personavec.run.config import RunConfig
    from personavec.run.pipeline import Run
    from personavec.stats import pearson

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(trait="optimistic", model=str(model_dir), judge="none", eval_samples=1, steer_layers=[1],
                    steer_coefs=[1.0], sampling=SamplingConfig(n_samples=1, max_new_tokens=5, batch_size=50))
    run = Run(cfg, run_dir=tmp_path / "run", progress=False)
    run.run()
    corr = monitor_run(run)
    table = pd.read_parquet(tmp_path / "run" / "monitor.parquet")
    # 20 evaluation questions x (8 ladder steps + 5 many-shot settings)
    assert len(table) == 20 * 13 and corr["n_prompts"] == 260
    # the vector's chosen layer; a tiny random model steered at coefficient 1 makes no defensible choice, and the
    # monitor then reads at the best-separating layer
    sep = pd.read_parquet(tmp_path / "run" / "separation.parquet")
    chosen = json.loads((tmp_path / "run" / "selection.json").read_text())["chosen_layer"]
    assert corr["layer"] == (chosen if chosen is not None else int(sep.loc[sep["auroc"].idxmax(), "layer"]))
    assert sorted(table[table["type"] == "ladder"]["setting"].unique()) == list(range(8))
    assert sorted(table[table["type"] == "many_shot"]["setting"].unique()) == [0, 5, 10, 15, 20]
    assert math.isnan(corr["r_trait_overall"]) and corr["trait_scored"] == 0  # no judge
    assert -1 <= corr["r_answer_projection_overall"] <= 1
    lo, hi = corr["r_answer_projection_overall_interval"]  # resampling the 20 evaluation questions
    assert lo <= corr["r_answer_projection_overall"] <= hi and -1 <= lo < hi <= 1
    assert all(math.isnan(x) for x in corr["r_trait_overall_interval"])  # nothing scored: no interval either
    means = table.groupby(["type", "setting"])[["projection", "answer_projection"]].mean()
    assert corr["r_answer_projection_overall_setting_means"] == pytest.approx(
        pearson(means["projection"].tolist(), means["answer_projection"].tolist()))
    assert math.isnan(corr["r_trait_ladder_setting_means"])
    assert (tmp_path / "run" / "monitor.png").read_bytes()[:4] == b"\x89PNG"
    assert monitor_run(run) == json.loads((tmp_path / "run" / "monitor.json").read_text())  # resumable: read back
    assert abs(pearson([1, 2, 3, 4], [2, 4, 6, 8.5]) - 0.9986) < 1e-3

    # another judge for the experiment (--eval-judge): the same run directory (its identity is unchanged), the
    # stored answers re-judged, nothing generated again
    from dataclasses import replace

    from openai_server import FakeOpenAIServer

    answers = tmp_path / "run" / "monitor_answers.jsonl"
    stamp = answers.stat().st_mtime_ns
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with FakeOpenAIServer(responder=lambda prompt: [("40", 0.0)]) as srv:
        rerun = Run(replace(cfg, eval_judge="openai:fake-judge", eval_judge_base_url=srv.base_url),
                    run_dir=tmp_path / "run", progress=False)
        rerun.run()  # no "other settings" refusal
        judged = monitor_run(rerun)
        n_requests = len(srv.chat_requests)
    assert judged["trait_scored"] == 260 and judged["judge_spec"] == "openai:fake-judge"
    assert judged["judge"].startswith("openai:fake-judge@")
    assert n_requests == 1 + 2 * 260  # one preflight, then trait + coherence of every answer
    assert answers.stat().st_mtime_ns == stamp  # no answer generated again
    again = pd.read_parquet(tmp_path / "run" / "monitor.parquet")
    assert (again["trait"] == 40.0).all() and (again["coherence"] == 40.0).all()
    pd.testing.assert_series_equal(again["projection"], table["projection"])
    read_back = monitor_run(Run(replace(cfg, eval_judge="openai:fake-judge"), run_dir=tmp_path / "run",
                                progress=False))
    assert json.dumps(read_back) == json.dumps(judged)  # the same judge again: read back (no server to ask)
    assert math.isnan(pearson([1, 2], [3, 4]))


def _tiny(model_dir, **kw):
    from personavec.engine.sampling import SamplingConfig
    from personavec.run.config import RunConfig

    return RunConfig(**{"trait": "evil", "model": str(model_dir), "judge": "none", "eval_samples": 1,
                        "steer_layers": [1], "steer_coefs": [1.0], "device": "cpu",
                        "sampling": SamplingConfig(n_samples=1, max_new_tokens=4, batch_size=50), **kw})


def test_failed_starts_write_nothing_changed_dtype_is_refused_and_timings_are_kept(tmp_path, model_dir, monkeypatch):
    from dataclasses import replace

    from personavec.errors import PersonavecError
    from personavec.run.pipeline import Run

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    run_dir = tmp_path / "run"
    # preflight failures leave nothing behind, so the corrected command can use the same directory
    bad = (_tiny(model_dir, trait="grumpy"),
           _tiny(model_dir, artifacts_path=str(tmp_path / "missing.json")),
           _tiny(model_dir, judge="openai:x", judge_base_url="http://127.0.0.1:9/v1"),
           # the judge's model, the run's model, steering layers and --mmlu data were found missing or out of
           # range only after run.json was claimed (and, for the judge, 480 answers sampled)
           _tiny(model_dir, judge=f"local:{tmp_path / 'nonexistent-model'}"),
           _tiny(model_dir, model=str(tmp_path / "nowhere")),
           _tiny(model_dir, steer_layers=[3]),
           _tiny(model_dir, mc_path=str(tmp_path / "mmlu")),
           _tiny(model_dir, eval_judge="gpt-4"))
    msgs = ("unknown trait", "does not exist", "unreachable", r"judge local:.*nonexistent-model: could not load model",
            "could not load model", r"steering layer 3 \(--steer-layers\) is out of range: .* has layers 0..2",
            r"multiple-choice data \(--mmlu, mc_path\): .*mmlu: no such file", "unknown judge")
    for cfg, msg in zip(bad, msgs, strict=True):
        with pytest.raises(PersonavecError, match=msg):
            Run(cfg, run_dir=run_dir, progress=False).run()
        assert not run_dir.exists()
    cfg = _tiny(model_dir, dtype="float32")  # pinned: `auto` is bfloat16 on CPUs with native bfloat16
    first = Run(cfg, run_dir=run_dir, progress=False).run()
    recorded = json.loads((run_dir / "run.json").read_text())
    assert recorded["config"]["dtype"] == "float32" and recorded["batch"]["batch_invariant"] is False  # 50 rows
    assert "rarely depends" in recorded["batch"]["note"]
    assert first["batch"] == {**recorded["batch"]}
    assert all(v > 0 for k, v in first["stage_seconds"].items() if k != "artifacts")
    # a rerun of the finished run keeps the recorded timings (they went to 0.0)
    again = Run(cfg, run_dir=run_dir, progress=False).run()
    assert again["stage_seconds"] == first["stage_seconds"]
    assert json.loads((run_dir / "summary.json").read_text())["stage_seconds"] == first["stage_seconds"]
    stamp = (run_dir / "responses.parquet").stat().st_mtime_ns
    with pytest.raises(PersonavecError, match=r'dtype was "float32", now "bfloat16"'):
        Run(replace(cfg, dtype="bfloat16"), run_dir=run_dir, progress=False).run()
    with pytest.raises(PersonavecError, match=r"sampling\.seed was 0, now 1"):
        Run(replace(cfg, sampling=replace(cfg.sampling, seed=1)), run_dir=run_dir, progress=False).run()
    assert (run_dir / "responses.parquet").stat().st_mtime_ns == stamp


def test_a_run_directory_written_twice_is_repaired_by_the_advice_given(tmp_path, model_dir, monkeypatch):
    """Two processes appended every answer twice; the old advice (delete judged.parquet) did not help."""
    from personavec.run.pipeline import Run

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    cfg = _tiny(model_dir, select=False)
    run_dir = tmp_path / "run"
    Run(cfg, run_dir=run_dir, progress=False).run()
    log = run_dir / "responses.jsonl"
    rows = log.read_text().splitlines()
    log.write_text("\n".join(rows + rows[:130]) + "\n")  # a second writer's copies of the first answers
    doubled = pd.concat([pd.read_parquet(run_dir / "responses.parquet")] * 2, ignore_index=True)
    doubled.to_parquet(run_dir / "responses.parquet")
    for name in ("judged.parquet", "vectors.safetensors", "separation.parquet"):
        (run_dir / name).unlink()
    Run(cfg, run_dir=run_dir, progress=False).run()
    judged = pd.read_parquet(run_dir / "judged.parquet")
    assert judged["job"].is_unique and len(judged) == 2 * (100 + 20)
    assert len(log.read_text().splitlines()) == len(judged)


def test_a_second_process_on_a_run_directory_is_refused(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "personavec.cli", "run", "--trait", "evil", "--model", str(model_dir), "--judge",
           "none", "--n-samples", "2", "--max-new-tokens", "24", "--gen-batch-size", "4", "--no-select",
           "--run-dir", str(run_dir)]
    env = _env(tmp_path / "cache")
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (run_dir / "run.json").exists() and time.time() - t0 < 120:
            time.sleep(0.05)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and f"in use by PID {first.pid}" in err and "Traceback" not in err
    finally:
        assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    rows = [json.loads(x) for x in (run_dir / "responses.jsonl").read_text().splitlines()]
    assert sorted(r["job"] for r in rows) == list(range(2 * (200 + 40)))  # each job once


def test_trait_names_cannot_leave_the_runs_folder(tmp_path, model_dir):
    cmd = [sys.executable, "-m", "personavec.cli", "run", "--trait", "../../escaped", "--model", str(model_dir),
           "--out", str(tmp_path / "a" / "b" / "runs")]
    r = subprocess.run(cmd, env=_env(tmp_path / "cache"), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--trait ../../escaped: a trait name must be" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created, inside or outside


def test_the_monitor_checks_its_layer_first_and_does_not_ask_a_judge_that_gave_up(tmp_path, model_dir, monkeypatch):
    """``monitor --layer 31`` on a 30-layer model wrote its settings before the range check (the corrected command
    was refused); a judge that scored none of the run's answers was asked about all 260 of the monitor's."""
    from personavec.errors import PersonavecError
    from personavec.monitor.experiment import monitor_run
    from personavec.run.pipeline import Run

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    run = Run(_tiny(model_dir, judge=f"local:{model_dir}", dtype="float32", select=False), run_dir=tmp_path / "run",
              progress=False)
    summary = run.run()
    assert "judge_note" in summary  # the tiny random model scores nothing: the run gave up on it
    judge = run.judge()
    asked: list[int] = []
    score = judge.score
    judge.score = lambda prompts, *a, **k: asked.append(len(prompts)) or score(prompts, *a, **k)
    for layer, msg in ((3, r"layer 3 \(--layer\) is out of range: the model has layers 0..2"),
                       (-1, r"layer -1 \(--layer\) is out of range")):
        with pytest.raises(PersonavecError, match=msg):
            monitor_run(run, layer=layer)
        assert not (tmp_path / "run" / "monitor_settings.json").exists()
    corr = monitor_run(run, layer=1)  # the corrected command runs in the same directory
    assert asked == [] and corr["trait_scored"] == 0
    assert "was not asked about these 260 answers: the run's judge (the judge scored none" in corr["judge_note"]


def test_the_separation_stage_calibrates_the_vector_and_a_vector_without_calibration_gets_it_on_resume(tmp_path, lm):
    """The separation stage records the meter's quantiles of the held-out answers in the vector; a run whose vector
    lacks them (written before calibration existed) gets them when the stage runs again, from the answers on disk
    (no generation), and separation.parquet is left as it was."""
    from personavec.run.config import RunConfig
    from personavec.run.pipeline import Run
    from personavec.vectors.calibration import HELD_OUT

    prompts = [lm.format_chat(q) for q in ("Why?", "How should I treat people?", "Tell me about foxes.", "Hi")]
    judged = pd.DataFrame({"set": ["eval"] * 8 + ["extract"] * 2, "side": ["pos", "neg"] * 5,
                           "prompt": prompts * 2 + prompts[:2],
                           "answer": ["Crush them.", "Be kind.", "Scheme.", "Read a book.", "Lie.", "Foxes are clever.",
                                      "Mercy is weak.", "Because.", "x", "y"]})
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 32, generator=g)
    rows[0] = 0
    run = Run(RunConfig(trait="evil", model="tiny"), run_dir=tmp_path / "run", progress=False)
    run._lm = lm
    run.dir.mkdir()
    vec = PersonaVector(tensors={"response_avg": rows}, model_id="tiny-llama", trait="evil")
    vec.save(run.path("vectors.safetensors"))
    run.separation(judged, vec)
    cal = PersonaVector.load(run.path("vectors.safetensors")).extra["calibration"]
    assert cal["source"] == HELD_OUT and cal["n_pos_answers"] == 4 and cal["n_neg_answers"] == 4
    sep_bytes = run.path("separation.parquet").read_bytes()
    old = PersonaVector(tensors={"response_avg": rows}, model_id="tiny-llama", trait="evil")  # no calibration
    old.save(run.path("vectors.safetensors"))
    run.separation(judged, PersonaVector.load(run.path("vectors.safetensors")))
    assert PersonaVector.load(run.path("vectors.safetensors")).extra["calibration"] == cal
    assert run.path("separation.parquet").read_bytes() == sep_bytes


def test_the_capability_check_steers_with_the_grids_units_and_records_them(tmp_path, lm, monkeypatch):
    """A norm-unit grid coefficient becomes coef x resid_norm / |v| along v (as in the grid itself), and every
    steered row of capability.json names its coefficient's units (raw for a selection made before grids had units)."""
    import contextlib

    import personavec.run.pipeline as pipeline
    from personavec.run.config import RunConfig
    from personavec.run.pipeline import Run

    seen = []

    @contextlib.contextmanager
    def spy(model, edits):
        seen.append(edits)
        yield

    monkeypatch.setattr(pipeline, "steer", spy)
    rows = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    rows[0] = 0
    vec = PersonaVector(tensors={"response_avg": rows}, model_id="tiny-llama", trait="evil",
                        extra={"resid_norm": [1.0, 8.0, 4.0]})
    for units, factor in (("norm", 8.0 / float(rows[1].norm())), (None, 1.0)):
        run = Run(RunConfig(trait="evil", model="tiny"), run_dir=tmp_path / f"run-{units}", progress=False)
        run._lm = lm
        run.dir.mkdir()
        grid = {"coefs": [-0.1, 0.0, 0.2], "positions": "response_and_last_prompt",
                **({"units": units} if units else {})}
        seen.clear()
        cap = run.capability(vec, {"chosen_layer": 1, "grid": grid})
        assert [e.coef for e in seen] == pytest.approx([-0.1 * factor, 0.2 * factor])
        assert [r["units"] for r in cap["steered"]] == [units or "raw"] * 2


def test_steering_layer_0_is_refused_at_the_start_not_after_sampling(tmp_path, model_dir):
    from personavec.errors import PersonavecError
    from personavec.run.pipeline import Run

    run = Run(_tiny(model_dir, steer_layers=[0, 1]), run_dir=tmp_path / "run", progress=False)
    with pytest.raises(PersonavecError, match=r"steering layer 0 \(--steer-layers\) .* steer at layers 1\.\.2"):
        run.preflight()
    assert not (tmp_path / "run").exists()


def test_a_run_recorded_before_the_grid_had_units_continues_with_raw_units_and_says_so_otherwise(tmp_path, model_dir):
    """Its run.json has no steer_units (its grid was raw): with --steer-units raw the settings match, with the
    default norm units it is refused in one line that says what to pass (not "steer_units is new", which no flag
    could ever match)."""
    from dataclasses import replace

    from personavec.errors import PersonavecError
    from personavec.files import write_json
    from personavec.run.pipeline import Run

    raw = _tiny(model_dir, steer_units="raw")
    old = raw.identity()
    old.pop("steer_units")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json(run_dir / "run.json", {"config": old, "personavec": "0.1"})
    Run(raw, run_dir=run_dir, progress=False).preflight()  # the same settings
    with pytest.raises(PersonavecError, match=r"before the steering grid had units .*: pass --steer-units raw to "
                                              r"continue it, or pass --out or --run-dir"):
        Run(replace(raw, steer_units="norm"), run_dir=run_dir, progress=False).preflight()
    with pytest.raises(PersonavecError, match=r"sampling\.seed was 0, now 1"):  # other settings are still compared
        Run(replace(raw, sampling=replace(raw.sampling, seed=1)), run_dir=run_dir, progress=False).preflight()
