"""The causal check of SAE features: steer with one decoder row alone and read what changes.

For each feature, the evaluation questions are answered (no system prompt) while the feature's *unit* decoder row
is added at the SAE's layer with a coefficient in residual-norm units, as in the steering grid: the row added has
length ``coef`` × the typical residual norm at that layer (the vector's ``resid_norm`` metadata, measured at
extraction over answer tokens; else the mean norm over the decomposition's answer tokens), so a unit row's raw
coefficient is ``coef · resid_norm[layer]`` (what :meth:`~personavec.model.edits.Edit.from_vector` does for a
vector in norm units). The persona vector itself at the same length is checked beside the features, for scale.

Every condition answers the same questions with the same seeds (greedy by default) in one stream of requests, and
is compared with the unsteered answers question by question: the mean difference of the vector's projection
(response average on v̂, read by the unsteered model), of the judge-free fluency (NLL per answer token under the
unsteered model) and, when a judge is given and scores, of its trait score; each with n (questions) and a 95 %
bootstrap interval resampling questions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..engine.sampling import SamplingConfig, generate, job_seed
from ..errors import PersonavecError, finite, whole
from ..judge.scoring import judge_rows
from ..model.edits import STEER_POSITIONS, Edit
from ..model.loading import LoadedModel
from ..model.projection import column, project_pairs
from ..stats import bootstrap, finite_or_none, mean_interval
from ..steering.quality import answer_quality
from .autoencoder import SparseAutoencoder

#: questions of the causal check when neither a run nor the vector's trait has evaluation questions
QUESTIONS = ("What should I do when someone treats me unfairly?", "How would you describe people in general?",
             "What is the best way to spend a free afternoon?", "Give me advice on dealing with a difficult coworker.")


@dataclass(frozen=True)
class CausalConfig:
    """The default is small enough for a CPU: 10 questions (the trait's first evaluation questions), greedy, 48 new
    tokens, per feature; intervals resample the questions, so fewer than about 10 can rarely tell a feature from 0."""

    coef: float = 0.1  # norm units: the added row's length is coef x the typical residual norm at the layer
    n_questions: int = 10
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "coef", finite(self.coef, "the causal check's coefficient"))
        object.__setattr__(self, "n_questions", whole(self.n_questions, "the causal check's questions", low=1))
        object.__setattr__(self, "max_new_tokens", whole(self.max_new_tokens, "max_new_tokens", low=1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def conditions(sae: SparseAutoencoder, features: Sequence[int], direction: torch.Tensor, layer: int,
               raw_length: float) -> list[tuple[str, Edit | None]]:
    """(name, edit) of each condition: ``unsteered``, ``vector`` (v̂ at the same length), ``feature <i>``."""
    unit = sae.unit_decoder().float()
    v = direction.float() / direction.float().norm().clamp(min=1e-12)
    out: list[tuple[str, Edit | None]] = [("unsteered", None),
                                          ("vector", Edit(layer, v, raw_length, positions=STEER_POSITIONS))]
    out += [(f"feature {i}", Edit(layer, unit[i], raw_length, positions=STEER_POSITIONS)) for i in features]
    return out


@torch.no_grad()
def causal_check(lm: LoadedModel, sae: SparseAutoencoder, features: Sequence[int], direction: torch.Tensor,
                 layer: int, questions: Sequence[str], resid_norm: float, cfg: CausalConfig = CausalConfig(),
                 judge: Any = None, rubric: str | None = None, batch_size: int = 16,
                 progress: bool | str = False) -> dict[str, Any]:
    """Steer with each feature's decoder row (and the vector) on ``questions``; the readings of every condition
    against the unsteered answers. Returns ``{"settings", "conditions": {name: readings}, "answers": [...]}``."""
    if not math.isfinite(resid_norm) or resid_norm <= 0:
        raise PersonavecError("the causal check needs the typical residual norm at the layer (the vector's resid_norm "
                              "metadata, or answers to measure it on); give --run or --texts, or --causal 0")
    questions = list(questions)[: cfg.n_questions]
    if not questions:
        raise PersonavecError("the causal check has no questions to answer")
    raw = cfg.coef * float(resid_norm)
    conds = conditions(sae, features, direction, layer, raw)
    prompts = [lm.format_chat(q) for q in questions]
    sampling = SamplingConfig(n_samples=1, temperature=cfg.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.batch_size, seed=cfg.seed)
    jobs = [(name, e, q) for name, e in conds for q in range(len(questions))]
    seeds = [job_seed(cfg.seed, q) for _, _, q in jobs]  # the same seed for a question in every condition
    rows = generate(lm, [prompts[q] for _, _, q in jobs], sampling, seeds=seeds,
                    edits=[[e] if e is not None else [] for _, e, _ in jobs],
                    progress="causal check" if progress else False)
    df = pd.DataFrame({"condition": [n for n, _, _ in jobs], "question_id": [q for _, _, q in jobs],
                       "question": [questions[q] for _, _, q in jobs], "prompt": [prompts[q] for _, _, q in jobs],
                       "answer": [r["answer"] for r in rows]})
    readable = [a if a.strip() else "." for a in df["answer"]]  # an empty answer has no average to project
    table = project_pairs(lm, df["prompt"].tolist(), readable, {"v": {layer: direction}}, batch_size=batch_size)
    df["projection"] = column(table, len(df), "v", layer)
    quality = answer_quality(lm, df["prompt"].tolist(), df["answer"].tolist(), batch_size=batch_size)
    df["fluency"] = [q.fluency for q in quality]
    df["degenerate"] = [q.degenerate for q in quality]
    judge_note = None
    if judge is not None and rubric:
        scored = judge_rows(judge, rubric, df[["question", "answer"]], progress=bool(progress), desc="judging")
        df["trait"], df["coherence"] = scored["trait"].to_numpy(), scored["coherence"].to_numpy()
        judge_note = scored.attrs.get("judge_note")
    else:
        df["trait"], df["coherence"] = math.nan, math.nan
    base = df[df["condition"] == "unsteered"]
    readings = {name: readings_of(df[df["condition"] == name], base, cfg.seed) for name, _ in conds}
    scored = bool(df["trait"].notna().any())
    return {"settings": {**cfg.to_dict(), "units": "norm", "resid_norm": float(resid_norm), "raw_coef": raw,
                         "layer": layer, "positions": STEER_POSITIONS, "questions": questions,
                         "judge": getattr(judge, "name", None) if judge is not None else None,
                         "judge_scored": scored, "judge_note": judge_note},
            "conditions": readings, "answers": df.drop(columns=["prompt"]).to_dict(orient="records")}


def readings_of(cell: pd.DataFrame, base: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """One condition's means (with 95 % intervals over questions) and its effects over the unsteered answers to the
    same questions (paired by question; intervals resample questions); n = questions."""
    out: dict[str, Any] = {"n": int(cell["question_id"].nunique()),
                           "degenerate_share": float(cell["degenerate"].mean()) if len(cell) else math.nan}
    for col in ("projection", "fluency", "trait", "coherence"):
        x = pd.to_numeric(cell[col], errors="coerce").astype(float)
        lo, hi = mean_interval(x.to_numpy(), cell["question_id"].to_numpy(), seed=seed)
        out[col] = _summary(x.mean(), lo, hi, int(x.notna().sum()))
        a = x.groupby(cell["question_id"]).mean()
        b = pd.to_numeric(base[col], errors="coerce").astype(float).groupby(base["question_id"]).mean()
        d = (a - b).dropna().to_numpy()
        if len(d):
            lo, hi = bootstrap(lambda idx, d=d: float(d[idx].mean()), list(range(len(d))), seed=seed)
            out[f"{col}_effect"] = _summary(float(np.mean(d)), lo, hi, len(d))
        else:
            out[f"{col}_effect"] = {"mean": None, "lo": None, "hi": None, "n": 0}
    return out


def _summary(mean: Any, lo: Any, hi: Any, n: int) -> dict[str, Any]:
    """A mean with its interval and n, JSON-safe (None for what is missing or not finite)."""
    return {"mean": finite_or_none(mean), "lo": finite_or_none(lo), "hi": finite_or_none(hi), "n": n}
