"""The fine-tuning experiment (paper §4–5): does a fine-tune's shift along v predict the trait it teaches,
and does preventative steering (or CAFT) stop the model from learning it?

On a finished run (``personavec run``) this builds trait / normal mixtures from the run's own answers
(:mod:`personavec.traitdata`), fine-tunes one LoRA adapter per condition — each mixture plain, with
preventative steering (+α·v at the chosen layer during training), and the trait data with CAFT (v̂ ablated
during training) — and evaluates the base model and every fine-tune the same way:

* **shift**: mean last-prompt activation on the evaluation prompts, tuned − base, projected on v̂ (every layer);
* **trait / coherence**: the run's judge on answers to the held-out evaluation questions (no system prompt);
* **answer projection**: the base model's response-average projection of those answers on v̂ at the chosen
  layer — a judge-free reading of how much trait the answers carry (used when the judge cannot score);
* **capability**: multiple-choice accuracy.

Everything lives in ``<run>/finetune/``; each condition's adapter and evaluation are written atomically and
skipped when present, training resumes from checkpoints, and sampling/judging resume as in the main run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .errors import PersonavecError
from .finetune import TrainConfig, is_trained, load_adapter, read_chats, train_lora
from .generation import SamplingConfig, run_sampling
from .models import LoadedModel, load_model
from .monitoring import pearson
from .shift import last_prompt_means, plot_shifts, shift_table
from .steering import Edit
from .tables import write_table
from .traitdata import write_mixtures
from .vectors import PersonaVector

INTERVENTIONS = ("none", "prevent", "caft")


@dataclass
class FTExperimentConfig:
    percents: list[float] = field(default_factory=lambda: [0, 25, 50, 75, 100])
    prevent_percents: list[float] | None = None  # mixtures also trained with preventative steering (default: > 0 %)
    caft_percents: list[float] = field(default_factory=lambda: [100])
    layer: int | None = None  # intervention + read-out layer (default: the vector's chosen layer)
    prevent_coef: float = 5.0  # raw units of the vector, as in the paper (α = 5 × raw vector)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_samples: int = 2
    max_new_tokens: int = 64
    batch_size: int = 20
    seed: int = 0
    mc: bool = True

    def conditions(self) -> list[tuple[str, float, str]]:
        """(name, percent, intervention) of every fine-tune."""
        prev = [p for p in self.percents if p > 0] if self.prevent_percents is None else self.prevent_percents
        out = [(f"mix{round(p):03d}", p, "none") for p in self.percents]
        out += [(f"mix{round(p):03d}+prevent", p, "prevent") for p in prev]
        out += [(f"mix{round(p):03d}+caft", p, "caft") for p in self.caft_percents]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _num(x: Any) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return math.nan
    return x


class FineTuneExperiment:
    """The experiment over one run directory (see module docstring)."""

    def __init__(self, run: Any, cfg: FTExperimentConfig, progress: bool = True) -> None:
        self.run = run
        self.cfg = cfg
        self.progress = progress
        self.dir = Path(run.dir) / "finetune"
        self.vec = PersonaVector.load(run.path("vectors.safetensors"))
        self.layer = cfg.layer if cfg.layer is not None else self.vec.chosen_layer
        if self.layer is None:
            raise PersonavecError("the run's vector has no chosen layer; pass --layer")
        from .artifacts import TraitArtifacts

        self.art = TraitArtifacts.load(run.path("artifacts.json"))
        self._base_means: torch.Tensor | None = None

    # ---- pieces ----
    @property
    def base(self) -> LoadedModel:
        return self.run.lm

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.dir / "experiment.json"
        ident = json.loads(json.dumps({**self.cfg.to_dict(), "layer": self.layer}, default=str))
        run_only = ("max_steps", "save_every", "keep_checkpoints")
        for k in run_only:
            ident["train"].pop(k, None)
        if p.exists() and json.loads(p.read_text()) != ident:
            raise PersonavecError(f"{self.dir} holds a fine-tuning experiment with other settings; move it away "
                                  "or pass the same settings")
        if not p.exists():
            _atomic_json(p, ident)

    def datasets(self) -> dict[str, Path]:
        data = self.dir / "data"
        judged = pd.read_parquet(self.run.path("judged.parquet"))
        percents = sorted({p for _, p, _ in self.cfg.conditions()})
        return write_mixtures(judged, data, percents, seed=self.cfg.seed)

    def edits(self, intervention: str) -> list[Edit]:
        v = self.vec.get(self.layer)
        if intervention == "prevent":
            return [Edit(layer=self.layer, direction=v, coef=self.cfg.prevent_coef)]
        if intervention == "caft":
            return [Edit(layer=self.layer, direction=v, kind="ablate")]
        return []

    def fresh_model(self) -> LoadedModel:
        rc = self.run.cfg
        return load_model(rc.model, device=rc.device, dtype=rc.dtype)

    def tuned(self, name: str, percent: float, intervention: str, data: dict[str, Path]) -> LoadedModel:
        out = self.dir / name
        lm = self.fresh_model()
        if is_trained(out):
            return load_adapter(lm, out)
        chats = read_chats(data[f"mix{round(percent):03d}"])
        train_lora(lm, chats, self.cfg.train, out, edits=self.edits(intervention),
                   progress=f"fine-tune {name}" if self.progress else False,
                   meta={"percent": percent, "intervention": intervention, "layer": self.layer})
        return lm

    def eval_prompts(self, lm: LoadedModel) -> list[str]:
        return [lm.format_chat(q) for q in self.art.evaluation_questions]

    def base_means(self) -> torch.Tensor:
        if self._base_means is None:
            self._base_means = last_prompt_means(self.base, self.eval_prompts(self.base))
        return self._base_means

    def evaluate(self, name: str, lm: LoadedModel) -> dict[str, Any]:
        """Shift, judged answers, answer projection and MC accuracy of one model; cached in ``<name>/eval.json``."""
        from .capability import builtin_mc, mc_accuracy, read_mmlu
        from .selection import judge_rows

        d = self.dir / name
        d.mkdir(parents=True, exist_ok=True)
        out = d / "eval.json"
        if out.exists():
            result = json.loads(out.read_text())
            if "answer_nll" not in result:  # written by an older version: add the fluency reading
                answers = pd.read_parquet(d / "answers.parquet")
                result["answer_nll"] = self.fluency(answers)
                _atomic_json(out, result)
            return result
        shifts = shift_table(self.base_means(), last_prompt_means(lm, self.eval_prompts(lm)), {"trait": self.vec})
        write_table(shifts, d / "shift.parquet")
        jobs = [{"question_id": q, "sample_id": s, "question": question, "prompt": lm.format_chat(question)}
                for q, question in enumerate(self.art.evaluation_questions) for s in range(self.cfg.eval_samples)]
        sampling = SamplingConfig(n_samples=self.cfg.eval_samples, max_new_tokens=self.cfg.max_new_tokens,
                                  batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        answers = pd.DataFrame(run_sampling(lm, jobs, sampling, d / "answers.jsonl",
                                            progress=f"answers {name}" if self.progress else False))
        judge = self.run.judge()
        if judge is not None:
            answers = judge_rows(judge, self.art, answers, progress=self.progress)
        else:
            answers["trait"], answers["coherence"] = math.nan, math.nan
        from .monitoring import projections

        v = self.vec.get(self.layer)
        unit = v / v.norm().clamp(min=1e-12)
        # read by the BASE model, so every fine-tune's answers are measured on the same scale
        answers["answer_projection"] = projections(self.base, answers["prompt"].tolist(), answers["answer"].tolist(),
                                                   unit, self.layer, "response_avg")
        write_table(answers, d / "answers.parquet")
        result: dict[str, Any] = {
            "model": name,
            "shift": float(shifts.loc[shifts["layer"] == self.layer, "shift"].iloc[0]),
            "shift_by_layer": shifts["shift"].round(5).tolist(),
            "trait": _num(answers["trait"].mean()), "trait_scored": int(answers["trait"].notna().sum()),
            "coherence": _num(answers["coherence"].mean()),
            "answer_projection": float(answers["answer_projection"].mean()),
            "answer_nll": self.fluency(answers),
            "n_answers": len(answers), "empty_answers": int((answers["answer"].str.strip() == "").sum()),
        }
        if self.cfg.mc:
            qs = read_mmlu(self.run.cfg.mc_path) if self.run.cfg.mc_path else builtin_mc()
            result["mc_accuracy"] = mc_accuracy(lm, qs).accuracy
        train = d / "train.json"
        if train.exists():
            t = json.loads(train.read_text())
            result.update(final_loss=t["losses"][-1] if t["losses"] else None, train_seconds=t["seconds"],
                          train_steps=t["steps"])
        _atomic_json(out, result)
        return result

    def fluency(self, answers: pd.DataFrame) -> float:
        """Mean per-token NLL of the answers under the base model (judge-free fluency; lower is more fluent)."""
        from .fluency import answer_nll

        nll = pd.Series(answer_nll(self.base, answers["prompt"].tolist(), answers["answer"].tolist()))
        return _num(nll.mean())

    # ---- the whole experiment ----
    def run_all(self) -> dict[str, Any]:
        self.write_config()
        data = self.datasets()
        rows = [{"model": "base", "percent": math.nan, "intervention": "base", **self.evaluate("base", self.base)}]
        for name, percent, intervention in self.cfg.conditions():
            ev_path = self.dir / name / "eval.json"
            if ev_path.exists() and is_trained(self.dir / name):
                ev = json.loads(ev_path.read_text())
            else:
                lm = self.tuned(name, percent, intervention, data)
                ev = self.evaluate(name, lm)
                del lm
            rows.append({"model": name, "percent": percent, "intervention": intervention, **ev})
        table = pd.DataFrame(rows)
        write_table(table.drop(columns=["shift_by_layer"]), self.dir / "finetune.parquet")
        summary = summarize(table, self.layer)
        summary["config"] = self.cfg.to_dict()
        _atomic_json(self.dir / "finetune.json", summary)
        plot(table, summary, self.dir / "finetune.png", f"{self.run.cfg.trait} — fine-tuning (layer {self.layer})")
        shifts = pd.concat([pd.read_parquet(self.dir / m / "shift.parquet").assign(model=m)
                            for m in table["model"] if m != "base"], ignore_index=True)
        write_table(shifts, self.dir / "shift.parquet")
        plot_shifts(shifts, self.dir / "finetune_shift.png", "fine-tuning shift per layer", mark_layer=self.layer)
        return summary


def summarize(table: pd.DataFrame, layer: int) -> dict[str, Any]:
    """Correlations across fine-tunes and what preventative steering / CAFT kept from being learned."""
    tuned = table[table["model"] != "base"]
    base = table[table["model"] == "base"].iloc[0]
    out: dict[str, Any] = {"layer": layer, "n_finetunes": len(tuned),
                           "trait_scored": int(tuned["trait_scored"].sum())}
    plain = tuned[tuned["intervention"] == "none"]
    out["r_shift_trait"] = pearson(tuned["shift"].tolist(), tuned["trait"].tolist())
    out["r_shift_answer_projection"] = pearson(tuned["shift"].tolist(), tuned["answer_projection"].tolist())
    out["r_shift_trait_plain"] = pearson(plain["shift"].tolist(), plain["trait"].tolist())
    out["r_shift_answer_projection_plain"] = pearson(plain["shift"].tolist(), plain["answer_projection"].tolist())
    out["base"] = {k: _num(base[k]) for k in ("shift", "trait", "coherence", "answer_projection", "answer_nll",
                                              "mc_accuracy") if k in base}
    prevention = []
    for p, g in tuned.groupby("percent"):
        ref = g[g["intervention"] == "none"]
        if ref.empty:
            continue
        ref = ref.iloc[0]
        for _, r in g[g["intervention"] != "none"].iterrows():
            entry: dict[str, Any] = {"percent": float(p), "intervention": r["intervention"]}
            for metric in ("trait", "answer_projection", "shift"):
                inc_plain = _num(ref[metric]) - _num(base[metric])
                inc_int = _num(r[metric]) - _num(base[metric])
                entry[f"{metric}_increase_plain"] = inc_plain
                entry[f"{metric}_increase_with"] = inc_int
                entry[f"{metric}_prevented"] = (1 - inc_int / inc_plain) if inc_plain and inc_plain > 0 else math.nan
            entry["coherence_change"] = _num(r["coherence"]) - _num(base["coherence"])
            entry["coherence_change_plain"] = _num(ref["coherence"]) - _num(base["coherence"])
            entry["answer_nll_change"] = _num(r.get("answer_nll")) - _num(base.get("answer_nll"))
            entry["answer_nll_change_plain"] = _num(ref.get("answer_nll")) - _num(base.get("answer_nll"))
            entry["mc_accuracy"] = _num(r.get("mc_accuracy"))
            prevention.append(entry)
    out["prevention"] = prevention
    return out


def plot(table: pd.DataFrame, summary: dict[str, Any], path: Path, title: str) -> Path:
    """Left: shift vs trait (judge, or the answers' projection without usable scores). Right: per condition."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    use_judge = summary["trait_scored"] >= 3
    y = "trait" if use_judge else "answer_projection"
    ylab = "judged trait score" if use_judge else "answers' projection (base model reading)"
    fig = Figure(figsize=(11, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2)
    markers = {"base": "*", "none": "o", "prevent": "s", "caft": "^"}
    for kind, g in table.groupby("intervention", sort=False):
        ax.scatter(g["shift"], g[y], marker=markers.get(kind, "o"), s=40, label=kind)
        for _, r in g.iterrows():
            ax.annotate(str(r["model"]).replace("mix", ""), (r["shift"], r[y]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    r = summary["r_shift_trait"] if use_judge else summary["r_shift_answer_projection"]
    ax.set(xlabel=f"fine-tuning shift along v̂ (layer {summary['layer']})", ylabel=ylab, title=f"r = {r:.2f}")
    ax.legend(fontsize=7)
    names = table["model"].tolist()
    xs = range(len(names))
    bx.bar(xs, table[y], color=["grey" if k == "base" else {"none": "C0", "prevent": "C1", "caft": "C2"}[k]
                                for k in table["intervention"]])
    bx.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    bx.set_ylabel(ylab)
    bx.set_title("per model (blue plain, orange preventative, green CAFT)")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def parse_percents(text: str | Sequence[float] | None) -> list[float] | None:
    if text is None:
        return None
    if isinstance(text, str):
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise PersonavecError(f"percentages must be comma-separated numbers, not {text!r}") from None
    return [float(x) for x in text]
