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

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..engine.sampling import SamplingConfig, run_sampling
from ..errors import PersonavecError
from ..files import claim_settings, read_json, save_figure, write_json, write_table
from ..finetuning.datasets import write_mixtures
from ..finetuning.shift import last_prompt_means, plot_shifts, shift_table
from ..model.edits import Edit
from ..model.loading import LoadedModel, load_model
from ..stats import pearson, pearson_interval
from ..vectors.vector import PersonaVector
from .conversations import read_chats
from .lora import TrainConfig, intervention_edits, is_trained, load_adapter, train_lora


def kind(intervention: str) -> str:
    """base | none | prevent | caft (``prevent2.5`` → ``prevent``)."""
    return "prevent" if intervention.startswith("prevent") else intervention


@dataclass
class FTExperimentConfig:
    percents: list[float] = field(default_factory=lambda: [0, 25, 50, 75, 100])
    prevent_percents: list[float] | None = None  # mixtures also trained with preventative steering (default: > 0 %)
    caft_percents: list[float] = field(default_factory=lambda: [100])
    layer: int | None = None  # intervention + read-out layer (default: the vector's chosen layer)
    prevent_coefs: list[float] = field(default_factory=lambda: [5.0])  # raw-vector units (paper: α = 5)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_samples: int = 2
    max_new_tokens: int = 64
    batch_size: int = 20
    seed: int = 0
    mc: bool = True

    def conditions(self) -> list[tuple[str, float, str]]:
        """(name, percent, intervention) of every fine-tune; ``prevent{α}`` names preventative steering at α."""
        prev = [p for p in self.percents if p > 0] if self.prevent_percents is None else self.prevent_percents
        out = [(f"mix{round(p):03d}", p, "none") for p in self.percents]
        out += [(f"mix{round(p):03d}+prevent{c:g}", p, f"prevent{c:g}") for c in self.prevent_coefs for p in prev]
        out += [(f"mix{round(p):03d}+caft", p, "caft") for p in self.caft_percents]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d




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
        from ..monitor.experiment import run_layer

        self.layer = run_layer(run, self.vec, cfg.layer)  # in range, with a direction, before anything is written
        from ..run.artifacts import TraitArtifacts

        self.art = TraitArtifacts.load(run.path("artifacts.json"))
        self._base_means: torch.Tensor | None = None

    # ---- pieces ----
    @property
    def base(self) -> LoadedModel:
        return self.run.lm

    def write_config(self) -> None:
        ident = {**self.cfg.to_dict(), "train": self.cfg.train.identity(), "layer": self.layer}
        for k in ("percents", "prevent_percents", "caft_percents", "prevent_coefs"):
            ident.pop(k)  # conditions may be added later; each one's own settings are checked by its fine-tune
        claim_settings(self.dir / "experiment.json", ident, "a fine-tuning experiment",
                       "move it away or pass the same settings")

    def datasets(self) -> dict[str, Path]:
        data = self.dir / "data"
        judged = pd.read_parquet(self.run.path("judged.parquet"))
        percents = sorted({p for _, p, _ in self.cfg.conditions()})
        return write_mixtures(judged, data, percents, seed=self.cfg.seed)

    def edits(self, intervention: str) -> list[Edit]:
        coef = float(intervention[len("prevent"):]) if kind(intervention) == "prevent" else None
        return intervention_edits(self.vec, [self.layer], prevent_coef=coef, caft=intervention == "caft")

    def fresh_model(self) -> LoadedModel:
        rc = self.run.cfg
        return load_model(rc.model, device=rc.device, dtype=rc.dtype)

    def tuned(self, name: str, data: Path, intervention: str = "none", meta: dict[str, Any] | None = None
              ) -> LoadedModel:
        """A fresh base model fine-tuned on ``data`` into ``<dir>/<name>`` (or its saved adapter, if trained)."""
        out = self.dir / name
        lm = self.fresh_model()
        if is_trained(out):
            return load_adapter(lm, out)
        train_lora(lm, read_chats(data), self.cfg.train, out, edits=self.edits(intervention),
                   progress=f"fine-tune {name}" if self.progress else False,
                   meta={**(meta or {}), "intervention": intervention, "layer": self.layer})
        return lm

    def train_and_evaluate(self, name: str, data: Path, intervention: str = "none",
                           meta: dict[str, Any] | None = None) -> dict[str, Any]:
        ev_path = self.dir / name / "eval.json"
        if ev_path.exists() and is_trained(self.dir / name):
            return self.evaluate(name, None)
        lm = self.tuned(name, data, intervention, meta)
        return self.evaluate(name, lm)

    def eval_prompts(self, lm: LoadedModel) -> list[str]:
        return [lm.format_chat(q) for q in self.art.evaluation_questions]

    def other_vectors(self) -> dict[str, PersonaVector]:
        """Vectors of the same model's other runs (``<runs>/<model>/<trait>/vectors.safetensors``), by trait."""
        out: dict[str, PersonaVector] = {}
        for p in sorted(Path(self.run.dir).parent.glob("*/vectors.safetensors")):
            if p.parent.resolve() == Path(self.run.dir).resolve():
                continue
            try:
                v = PersonaVector.load(p)
            except (PersonavecError, OSError, ValueError):
                continue
            if (v.n_layers, v.hidden_size) == (self.vec.n_layers, self.vec.hidden_size) and v.trait not in out:
                out[v.trait or p.parent.name] = v
        return out

    def base_means(self) -> torch.Tensor:
        if self._base_means is None:
            self._base_means = last_prompt_means(self.base, self.eval_prompts(self.base))
        return self._base_means

    def evaluate(self, name: str, lm: LoadedModel | None) -> dict[str, Any]:
        """Shift, judged answers, answer projection and MC accuracy of one model; cached in ``<name>/eval.json``
        (``lm`` may be None when that file exists)."""
        from ..steering.capability import builtin_mc, mc_accuracy, read_mmlu

        d = self.dir / name
        d.mkdir(parents=True, exist_ok=True)
        out = d / "eval.json"
        if out.exists():
            result = read_json(out)
            stale_judge = result.get("judge_spec", self.run.cfg.judge) != self.run.eval_judge_spec
            if stale_judge or "answer_nll" not in result or "coherence_scored" not in result:
                answers = pd.read_parquet(d / "answers.parquet")
                if stale_judge:  # another judge: re-judge the stored answers, nothing is regenerated
                    answers = self.judge_answers(answers, name)
                    write_table(answers, d / "answers.parquet")
                result.update(self.judged_fields(answers))
                result.setdefault("answer_nll", self.fluency(answers))
                write_json(out, result)
            return result
        if lm is None:
            raise PersonavecError(f"{name} has not been evaluated yet")
        tuned = self.base_means() if lm is self.base else last_prompt_means(lm, self.eval_prompts(lm))
        shifts = shift_table(self.base_means(), tuned, {"trait": self.vec, **self.other_vectors()})
        write_table(shifts, d / "shift.parquet")
        own = shifts[shifts["vector"] == "trait"]
        jobs = [{"question_id": q, "sample_id": s, "question": question, "prompt": lm.format_chat(question)}
                for q, question in enumerate(self.art.evaluation_questions) for s in range(self.cfg.eval_samples)]
        sampling = SamplingConfig(n_samples=self.cfg.eval_samples, max_new_tokens=self.cfg.max_new_tokens,
                                  batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        answers = pd.DataFrame(run_sampling(lm, jobs, sampling, d / "answers.jsonl",
                                            progress=f"answers {name}" if self.progress else False))
        answers = self.judge_answers(answers, name)
        from ..model.projection import unit
        from ..monitor.experiment import projections

        # read by the BASE model, so every fine-tune's answers are measured on the same scale
        answers["answer_projection"] = projections(self.base, answers["prompt"].tolist(), answers["answer"].tolist(),
                                                   unit(self.vec.get(self.layer)), self.layer, "response_avg")
        write_table(answers, d / "answers.parquet")
        result: dict[str, Any] = {
            "model": name,
            "shift": float(own.loc[own["layer"] == self.layer, "shift"].iloc[0]),
            "shift_by_layer": own["shift"].round(5).tolist(),
            "shift_other_traits": {trait: float(g.loc[g["layer"] == self.layer, "shift"].iloc[0])
                                   for trait, g in shifts[shifts["vector"] != "trait"].groupby("vector")},
            **self.judged_fields(answers),
            "answer_projection": float(answers["answer_projection"].mean()),
            "answer_nll": self.fluency(answers),
            "n_answers": len(answers), "empty_answers": int((answers["answer"].str.strip() == "").sum()),
        }
        if self.cfg.mc:
            qs = read_mmlu(self.run.cfg.mc_path) if self.run.cfg.mc_path else builtin_mc()
            result["mc_accuracy"] = mc_accuracy(lm, qs).accuracy
        train = d / "train.json"
        if train.exists():
            t = read_json(train)
            result.update(final_loss=t["losses"][-1] if t["losses"] else None, train_seconds=t["seconds"],
                          train_steps=t["steps"])
        write_json(out, result)
        return result

    def judge_answers(self, answers: pd.DataFrame, name: str) -> pd.DataFrame:
        """``trait`` and ``coherence`` columns from the experiment's judge (NaN without one, or when it gave up: it
        scored none of the first answers of the run or of an earlier model; the answers' ``attrs`` say so)."""
        return self.run.judge_experiment(self.art.rubric, answers, f"judging {name}")

    def judged_fields(self, answers: pd.DataFrame) -> dict[str, Any]:
        note = answers.attrs.get("judge_note")
        return {"trait": _num(answers["trait"].mean()), "trait_scored": int(answers["trait"].notna().sum()),
                "coherence": _num(answers["coherence"].mean()),
                "coherence_scored": int(answers["coherence"].notna().sum()),
                "judge_spec": self.run.eval_judge_spec, **({"judge_note": note} if note else {})}

    def fluency(self, answers: pd.DataFrame) -> float:
        """Mean per-token NLL of the answers under the base model (judge-free fluency; lower is more fluent)."""
        from ..steering.quality import answer_nll

        nll = pd.Series(answer_nll(self.base, answers["prompt"].tolist(), answers["answer"].tolist()))
        return _num(nll.mean())

    # ---- the whole experiment ----
    def run_all(self) -> dict[str, Any]:
        with self.run.locked():
            return self._run_all()

    def _run_all(self) -> dict[str, Any]:
        self.write_config()
        data = self.datasets()
        rows = [{"model": "base", "percent": math.nan, "intervention": "base", **self.evaluate("base", self.base)}]
        for name, percent, intervention in self.cfg.conditions():
            ev = self.train_and_evaluate(name, data[f"mix{round(percent):03d}"], intervention, {"percent": percent})
            rows.append({"model": name, "percent": percent, "intervention": intervention, **ev})
        table = pd.DataFrame(rows)
        write_table(table.drop(columns=["shift_by_layer", "shift_other_traits"], errors="ignore"),
                    self.dir / "finetune.parquet")
        summary = summarize(table, self.layer)
        if "shift_other_traits" in table.columns:  # specificity: the same fine-tunes read on other traits' vectors
            summary["shift_other_traits"] = {m: o for m, o in zip(table["model"], table["shift_other_traits"])
                                             if isinstance(o, dict) and o}
        summary["config"] = self.cfg.to_dict()
        summary["judge_spec"] = self.run.eval_judge_spec
        write_json(self.dir / "finetune.json", summary)
        plot(table, summary, self.dir / "finetune.png", f"{self.run.cfg.trait} — fine-tuning (layer {self.layer})")
        shifts = pd.concat([pd.read_parquet(self.dir / m / "shift.parquet").assign(model=m)
                            for m in table["model"] if m != "base"], ignore_index=True)
        write_table(shifts, self.dir / "shift.parquet")
        plot_shifts(shifts[shifts["vector"] == "trait"], self.dir / "finetune_shift.png",
                    "fine-tuning shift per layer", mark_layer=self.layer)
        from ..run.report import write_report

        write_report(self.run.dir)
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
    # 95 % bootstrap intervals resampling the fine-tunes (few points: read them as wide, which they are)
    for key, rows, col in (("r_shift_trait", tuned, "trait"), ("r_shift_answer_projection", tuned, "answer_projection"),
                           ("r_shift_trait_plain", plain, "trait"),
                           ("r_shift_answer_projection_plain", plain, "answer_projection")):
        out[key + "_interval"] = list(pearson_interval(rows["shift"], rows[col], range(len(rows))))
    y = "trait" if out["trait_scored"] >= 3 else "answer_projection"
    by_layer = [pearson([s[i] for s in tuned["shift_by_layer"]], tuned[y].tolist())
                for i in range(len(tuned["shift_by_layer"].iloc[0]))] if "shift_by_layer" in tuned else []
    out["r_by_layer"] = {"against": y, "r": [round(r, 4) for r in by_layer]}
    out["base"] = {k: _num(base[k]) for k in ("shift", "trait", "coherence", "answer_projection", "answer_nll",
                                              "mc_accuracy") if k in base}
    prevention = []
    normal = plain[plain["percent"] == 0]
    for p, g in tuned.groupby("percent"):
        ref = g[g["intervention"] == "none"]
        if ref.empty:
            continue
        ref = ref.iloc[0]
        for _, r in g[g["intervention"] != "none"].iterrows():
            entry: dict[str, Any] = {"percent": float(p), "intervention": r["intervention"]}
            # increases from the base model, and (when a 0 % fine-tune exists) from the model fine-tuned on normal
            # data alone: the part of the change that the trait content of the data causes
            refs = [("", base)] + ([("_vs_normal", normal.iloc[0])] if len(normal) and p > 0 else [])
            for metric in ("trait", "answer_projection", "shift"):
                for suffix, zero in refs:
                    inc_plain = _num(ref[metric]) - _num(zero[metric])
                    inc_int = _num(r[metric]) - _num(zero[metric])
                    entry[f"{metric}_increase_plain{suffix}"] = inc_plain
                    entry[f"{metric}_increase_with{suffix}"] = inc_int
                    entry[f"{metric}_prevented{suffix}"] = (1 - inc_int / inc_plain) if inc_plain > 0 else math.nan
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
    colors = {"base": "grey", "none": "C0", "prevent": "C1", "caft": "C2"}
    shapes = iter("sDPXv<>p")
    markers = {"base": "*", "none": "o", "caft": "^"}
    for label, g in table.groupby("intervention", sort=False):
        marker = markers.setdefault(label, next(shapes, "s"))
        ax.scatter(g["shift"], g[y], marker=marker, color=colors[kind(label)], s=40, label=label)
        for _, r in g.iterrows():
            ax.annotate(str(r["model"]).replace("mix", ""), (r["shift"], r[y]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    r = summary["r_shift_trait"] if use_judge else summary["r_shift_answer_projection"]
    ax.set(xlabel=f"fine-tuning shift along v̂ (layer {summary['layer']})", ylabel=ylab, title=f"r = {r:.2f}")
    ax.legend(fontsize=7)
    names = table["model"].tolist()
    xs = range(len(names))
    base_y = float(table.loc[table["model"] == "base", y].iloc[0])
    bx.bar(xs, table[y] - base_y, color=[colors[kind(k)] for k in table["intervention"]])
    bx.axhline(0, color="black", lw=0.6)
    bx.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    bx.set_ylabel("change from the base model")
    bx.set_title("per model (blue plain, orange preventative steering, green CAFT)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def parse_percents(text: str | Sequence[float] | None) -> list[float] | None:
    if text is None:
        return None
    if isinstance(text, str):
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = [math.nan]
    else:
        values = [float(x) for x in text]
    if not all(math.isfinite(x) for x in values):
        raise PersonavecError(f"expected comma-separated finite numbers, not {text!r}")
    return values
