"""The monitoring experiment (paper §3.3): does the last prompt token's projection predict the answer's trait?

Prompt settings, each applied to the trait's 20 evaluation questions:

* ``ladder``: 8 system prompts interpolating from fully suppressing (0) to fully eliciting (7) the trait
  (``ladder`` in the trait artifacts);
* ``many_shot``: no system prompt, 0/5/10/15/20 earlier user/assistant turns whose answers express the
  trait (taken from the run's own eliciting answers to the extraction questions).

For every (setting, question): the projection of the last prompt token on v̂ at the layer, computed before
anything is generated, and the mean judged trait score of ``n_samples`` generated answers. Pearson r is
reported overall and within each prompt type. As a judge-free check, the same correlation is also computed
against the answers' own response-average projection (read by the unsteered model).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..engine.sampling import SamplingConfig, run_sampling
from ..errors import PersonavecError, whole
from ..files import claim_settings, read_json, refuse_other_settings, save_figure, write_json, write_table
from ..judge.scoring import judge_rows
from ..model.loading import LoadedModel
from ..model.projection import column, project_pairs, unit
from ..run.artifacts import TraitArtifacts, builtin, builtin_traits
from ..run.pipeline import Run
from ..stats import mean_interval, pearson, pearson_interval
from ..vectors.vector import PersonaVector

log = logging.getLogger(__name__)

SHOTS = (0, 5, 10, 15, 20)


def build_prompts(lm: LoadedModel, art: TraitArtifacts, examples: Sequence[tuple[str, str]],
                  shots: Sequence[int] = SHOTS) -> list[dict[str, Any]]:
    """One job per (setting, evaluation question)."""
    ladder = art.ladder
    if len(ladder) != 8:
        raise PersonavecError(f"trait {art.name!r} has no 8-step system-prompt ladder; add 'ladder' (8 system "
                              "prompts, suppressing to eliciting) to its artifacts")
    if max(shots, default=0) > len(examples):
        raise PersonavecError(f"many-shot prompts need {max(shots)} trait-expressing examples, only "
                              f"{len(examples)} available")
    jobs = []
    for q, question in enumerate(art.evaluation_questions):
        for step, system in enumerate(ladder):
            jobs.append({"type": "ladder", "setting": step, "question_id": q, "question": question,
                         "prompt": lm.format_chat(question, system=system)})
        for k in shots:
            msgs: list[dict[str, str]] = []
            for eq, ea in examples[:k]:
                msgs += [{"role": "user", "content": eq}, {"role": "assistant", "content": ea}]
            msgs.append({"role": "user", "content": question})
            jobs.append({"type": "many_shot", "setting": k, "question_id": q, "question": question,
                         "prompt": lm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)})
    # group by prompt type and setting so that sampling batches hold prompts of similar length (a 20-shot
    # prompt is ~20x longer than a ladder prompt; mixing them would pad every row to the longest)
    jobs.sort(key=lambda j: (j["type"] != "ladder", j["setting"], j["question_id"]))
    return jobs


def projections(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], direction: torch.Tensor,
                layer: int, pooling: str, batch_size: int = 8, progress: bool | str = False) -> list[float]:
    """Scalar projection of each pair's ``pooling`` at ``layer`` on ``direction`` (made unit); NaN for an empty
    answer when the pooling averages over the answer."""
    table = project_pairs(lm, prompts, answers, {"v": {layer: direction}}, [pooling], batch_size=batch_size,
                          progress=progress)
    return column(table, len(prompts), "v", layer, pooling)


def run_experiment(lm: LoadedModel, art: TraitArtifacts, vec: PersonaVector, layer: int, judge: Any,
                   examples: Sequence[tuple[str, str]], out_dir: Path, sampling: SamplingConfig,
                   progress: bool = True, judging: Callable[..., pd.DataFrame] | None = None
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Generate, judge and project; returns the per-(setting, question) table and the correlations. ``judging``
    (``rubric, rows, desc`` → judged rows) replaces :func:`judge_rows` with ``judge`` (a run's
    :meth:`~personavec.run.pipeline.Run.judge_experiment`, which applies the run's give-up rule)."""
    jobs = build_prompts(lm, art, examples)
    direction = unit(vec.get(layer))
    before = projections(lm, [j["prompt"] for j in jobs], [""] * len(jobs), direction, layer, "prompt_last",
                         progress="monitor prompts" if progress else False)
    sample_jobs = [{**j, "sample_id": s, "projection": before[i], "row": i}
                   for i, j in enumerate(jobs) for s in range(sampling.n_samples)]
    rows = pd.DataFrame(run_sampling(lm, sample_jobs, sampling, out_dir / "monitor_answers.jsonl",
                                     progress="monitor sampling" if progress else False))
    if judging is not None:
        rows = judging(art.rubric, rows, "monitor judging")
    else:
        rows = judge_rows(judge, art.rubric, rows, progress=progress, desc="monitor judging")
    note = rows.attrs.get("judge_note")
    rows["answer_projection"] = projections(lm, rows["prompt"].tolist(), rows["answer"].tolist(), direction, layer,
                                            "response_avg", progress="monitor answers" if progress else False)
    table = (rows.groupby(["row", "type", "setting", "question_id"], as_index=False)
             .agg(projection=("projection", "first"), trait=("trait", "mean"), coherence=("coherence", "mean"),
                  answer_projection=("answer_projection", "mean"), n=("answer", "size")))
    corr: dict[str, Any] = {"layer": layer, "judge": getattr(judge, "name", "none"), "n_prompts": len(table),
                            "trait_scored": int(table["trait"].notna().sum())}
    if note:
        corr["judge_note"] = note
    # the same correlations over the means of each setting (13 points: 8 ladder steps, 5 shot counts), which
    # average out the sampling noise of single answers
    means = table.groupby(["type", "setting"], as_index=False)[["projection", "trait", "answer_projection"]].mean()
    for label, sub, msub in (("overall", table, means),
                             ("ladder", table[table["type"] == "ladder"], means[means["type"] == "ladder"]),
                             ("many_shot", table[table["type"] == "many_shot"], means[means["type"] == "many_shot"])):
        for y in ("trait", "answer_projection"):
            corr[f"r_{y}_{label}"] = pearson(sub["projection"].tolist(), sub[y].tolist())
            # 95 % interval resampling the evaluation questions (a question's prompts share its wording)
            corr[f"r_{y}_{label}_interval"] = list(pearson_interval(sub["projection"], sub[y], sub["question_id"]))
            corr[f"r_{y}_{label}_setting_means"] = pearson(msub["projection"].tolist(), msub[y].tolist())
    return table, corr


def plot(table: pd.DataFrame, corr: dict[str, Any], path: Path, title: str) -> None:
    """Scatter: last-prompt projection vs judged trait (or vs the answers' projection when unscored); each setting's
    mean drawn black with its 95 % interval over questions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y_col = "trait" if corr["trait_scored"] >= 3 else "answer_projection"
    fig = Figure(figsize=(6.4, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    sc = None
    for kind, marker, top in (("ladder", "o", 7.0), ("many_shot", "^", float(max(SHOTS)))):
        sub = table[table["type"] == kind]
        sc = ax.scatter(sub["projection"], sub[y_col], c=sub["setting"] / top, cmap="viridis", vmin=0.0, vmax=1.0,
                        marker=marker, s=18, label=kind.replace("_", "-"), alpha=0.8)
    label = "setting mean, 95 % interval"
    for (_, _), g in table.groupby(["type", "setting"]):  # each setting's mean with its 95 % interval (questions)
        y = g[y_col].to_numpy(dtype=float)
        if np.isfinite(y).any():
            lo, hi = mean_interval(y, g["question_id"].to_numpy())
            m = float(np.nanmean(y))
            if math.isfinite(lo) and math.isfinite(hi):
                ax.errorbar(float(g["projection"].mean()), m, yerr=[[m - lo], [hi - m]], fmt="s", ms=5, color="black",
                            capsize=2, lw=1, zorder=5, label=label)
                label = None
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="ladder step / 7, shots / 20 (0 = suppressing, 1 = eliciting)")
    key = "r_trait" if y_col == "trait" else "r_answer_projection"
    ax.set(xlabel=f"last prompt token projection (layer {corr['layer']})",
           ylabel="judged trait score" if y_col == "trait" else "answers' projection (no usable judge scores)",
           title=f"{title}\nr overall {corr[f'{key}_overall']:.2f}, ladder {corr[f'{key}_ladder']:.2f}, "
                 f"many-shot {corr[f'{key}_many_shot']:.2f}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def check_layer(vec: PersonaVector, layer: int | None) -> int:
    """The experiment's read-out layer: ``layer`` (``--layer``), else the vector's chosen one; refused when out of the
    vector's range or where its row is zero (no direction to read along)."""
    vec.direction(layer, flag="--layer")
    return vec.chosen_layer if layer is None else int(layer)


def run_layer(run: Any, vec: PersonaVector, layer: int | None) -> int:
    """An experiment's read-out layer on a run: ``layer``, else the vector's chosen one, else — when the run made no
    defensible steering choice — its best-separating layer (reading needs separation, not a steering setting);
    checked by :func:`check_layer`."""
    if layer is None and vec.chosen_layer is None and run.path("separation.parquet").exists():
        sep = pd.read_parquet(run.path("separation.parquet"))
        layer = int(sep.loc[sep["auroc"].idxmax(), "layer"])
        log.warning("the run made no defensible steering choice; reading at its best-separating layer %d (pass "
                    "--layer to choose another)", layer)
    return check_layer(vec, layer)


def monitor_run(run: Run, layer: int | None = None, n_samples: int = 1) -> dict[str, Any]:
    """The experiment on a finished run (``monitor.parquet``, ``monitor.json``, ``monitor.png`` in its directory);
    read back when done with the same judge, the stored answers re-judged when the judge changed."""
    with run.locked():
        vec = PersonaVector.load(run.path("vectors.safetensors"))
        layer = run_layer(run, vec, layer)
        n_samples = whole(n_samples, "n_samples (--monitor-samples)", low=1)
        settings = {"layer": layer, "n_samples": n_samples}
        todo = "pass the same --layer and --monitor-samples, or delete its monitor* files to start it over"
        refuse_other_settings(run.path("monitor_settings.json"), settings, "a monitoring experiment", todo)
        out = run.path("monitor.json")
        if out.exists():
            done = read_json(out)
            if done.get("judge_spec", run.cfg.judge) == run.eval_judge_spec:
                return done
            # another judge: the stored answers are re-judged (sampling resumes from monitor_answers.jsonl)
        art = TraitArtifacts.load(run.path("artifacts.json"))
        if not art.ladder and art.name in builtin_traits():
            art.ladder = builtin(art.name).ladder
        if len(art.ladder) != 8:  # checked here, before the directory is claimed (build_prompts checks it too)
            raise PersonavecError(f"trait {art.name!r} has no 8-step system-prompt ladder; add 'ladder' (8 system "
                                  "prompts, suppressing to eliciting) to its artifacts")
        judged = pd.read_parquet(run.path("judged.parquet"))
        pos = judged[(judged["set"] == "extract") & (judged["side"] == "pos") & (judged["answer"].str.strip() != "")]
        if pos["trait"].notna().any():
            pos = pos.sort_values("trait", ascending=False, kind="stable")
        pos = pos.drop_duplicates("question_id")  # one example per extraction question
        examples = list(zip(pos["question"], pos["answer"]))
        if max(SHOTS) > len(examples):
            raise PersonavecError(f"many-shot prompts need {max(SHOTS)} trait-expressing examples, only "
                                  f"{len(examples)} available")
        judge = run.eval_judge()  # built (an endpoint checked, a local model loaded) before anything is written
        claim_settings(run.path("monitor_settings.json"), settings, "a monitoring experiment", todo)
        sampling = replace(run.cfg.sampling, n_samples=n_samples)
        table, corr = run_experiment(run.lm, art, vec, layer, judge, examples, run.dir, sampling,
                                     progress=run.progress, judging=run.judge_experiment)
        corr["judge_spec"] = run.eval_judge_spec
        write_table(table, run.path("monitor.parquet"))
        plot(table, corr, run.path("monitor.png"), f"{run.cfg.trait} — {vec.model_id}")
        write_json(out, corr)
        return corr
