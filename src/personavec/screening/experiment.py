"""The screening experiment: does fine-tuning on the samples with the highest ΔP teach the most trait?

On a finished run it screens the run's trait/normal mixture with ΔP, fine-tunes on its top-n, random-n and
bottom-n samples (and top-n by the response projection alone, and by the judge when it scores) through the
fine-tuning experiment, and compares the fine-tuned models.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch

from ..errors import PersonavecError
from ..files import read_jsonl, write_json
from ..finetuning.datasets import paired_answers, write_jsonl, write_mixtures
from ..finetuning.experiment import FineTuneExperiment
from ..stats import auroc, bootstrap
from ..vectors.probe import Probe
from .scoring import ScreenConfig, screen_file


def screen_validation(exp: FineTuneExperiment, n: int = 100, percent: float = 50, seed: int = 0,
                      max_new_tokens: int = 64) -> dict[str, Any]:
    """Screen the ``percent`` % mixture with ΔP, fine-tune on its top / random / bottom ``n`` samples (and on
    the top ``n`` by judged trait, when the judge scores), and compare the fine-tuned models."""
    with exp.run.locked():
        return _screen_validation(exp, n, percent, seed, max_new_tokens)


def _screen_validation(exp: FineTuneExperiment, n: int, percent: float, seed: int,
                       max_new_tokens: int) -> dict[str, Any]:
    judged = pd.read_parquet(exp.run.path("judged.parquet"))
    n_rows = len(paired_answers(judged))  # the mixture's size, known before anything is written
    if not 0 < n < n_rows:
        raise PersonavecError(f"--n {n} is out of range: it must be between 1 and {n_rows - 1} (the mixture has "
                              f"{n_rows} samples)")
    if not 0 < percent <= 100:
        raise PersonavecError(f"--mix-percent {percent:g} is not a trait share to screen; give a percentage above 0 "
                              "and at most 100")
    exp.write_config()
    src = write_mixtures(judged, exp.dir / "data", [percent], seed=exp.cfg.seed)[f"mix{round(percent):03d}"]
    rows = read_jsonl(src)
    out = exp.dir / f"screen_mix{round(percent):03d}"
    cfg = ScreenConfig(mode="delta", chunk_rows=64, max_new_tokens=max_new_tokens, seed=seed)
    speed = screen_file(exp.base, src, [Probe("trait", exp.vec, (exp.layer,))], out, cfg, progress=exp.progress)
    table = pd.read_parquet(out / "screen.parquet")
    table["is_trait"] = [bool(r["is_trait"]) for r in rows]
    col = f"trait@L{exp.layer}:delta_p"
    order = table.sort_values(col, ascending=False, kind="stable")["row"].tolist()
    g = torch.Generator().manual_seed(seed + 7_919)  # not the mixture's own stream (that would pick its trait rows)
    selections = {f"top{n}": order[:n], f"random{n}": sorted(torch.randperm(len(rows), generator=g)[:n].tolist()),
                  f"bottom{n}": order[-n:]}
    cheap = table.sort_values(f"trait@L{exp.layer}:response", ascending=False, kind="stable")["row"].tolist()
    selections[f"response-top{n}"] = cheap[:n]
    ext = judged[(judged["set"] == "extract")]
    if ext["trait"].notna().sum() >= n:  # a judge that scores: the paper's alternative filter
        score = {(r.side, r.instruction_id, r.question_id, r.sample_id): r.trait for r in ext.itertuples()}
        js = [score.get(("pos" if r["is_trait"] else "neg", r["instruction_id"], r["question_id"], r["sample_id"]))
              for r in rows]
        table["judge_trait"] = js
        selections[f"judge-top{n}"] = table.sort_values("judge_trait", ascending=False, kind="stable",
                                                        na_position="last")["row"].head(n).tolist()
    results = []
    for name, sel in selections.items():
        path = write_jsonl([rows[i] for i in sel], exp.dir / "data" / f"screen_{name}.jsonl")
        ev = exp.train_and_evaluate(f"screen-{name}", path, "none", {"selection": name})
        results.append({"selection": name, "n": len(sel), "trait_share": float(table.loc[sel, "is_trait"].mean()),
                        "mean_delta_p": float(table.loc[sel, col].mean()),
                        **{k: ev.get(k) for k in ("shift", "trait", "coherence", "answer_projection", "answer_nll",
                                                  "mc_accuracy")}})
    base = exp.evaluate("base", exp.base)
    summary = {"mixture": src.name, "n": n, "layer": exp.layer, "column": col, "screen_throughput": speed,
               "dataset_delta_p": float(table[col].mean()),
               "auroc_delta_p_trait_rows": _auroc(table[col], table["is_trait"]),
               "auroc_delta_p_trait_rows_interval": _auroc_interval(table[col], table["is_trait"]),
               "auroc_response_trait_rows": _auroc(table[f"trait@L{exp.layer}:response"], table["is_trait"]),
               "auroc_response_trait_rows_interval": _auroc_interval(table[f"trait@L{exp.layer}:response"],
                                                                     table["is_trait"]),
               "base": {k: base.get(k) for k in ("trait", "answer_projection", "answer_nll")},
               "results": results}
    write_json(exp.dir / "screen_validation.json", summary)
    from ..run.report import write_report

    write_report(exp.run.dir)
    return summary


def _auroc_interval(scores: pd.Series, labels: pd.Series) -> list[float]:
    """95 % bootstrap interval of :func:`_auroc`, resampling the rows."""
    s, y = scores.reset_index(drop=True), labels.reset_index(drop=True)
    return list(bootstrap(lambda idx: _auroc(s.iloc[idx], y.iloc[idx]), list(range(len(s)))))


def _auroc(scores: pd.Series, labels: pd.Series) -> float:
    pos = scores[labels.astype(bool)].dropna().tolist()
    neg = scores[~labels.astype(bool)].dropna().tolist()
    return auroc(torch.tensor(pos), torch.tensor(neg)) if pos and neg else math.nan
