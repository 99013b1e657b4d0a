"""The automated pipeline: trait → artifacts → contrastive answers → judged, filtered → persona vector.

Stages write into a run directory (``runs/<model>/<trait>/``), each atomically, and are skipped when their
output exists, so killing the process at any moment and running the same command again finishes the run
without redoing finished work:

=============  ==========================================  ============================================
stage          output                                      resumes by
=============  ==========================================  ============================================
config         ``run.json``                                refusing a different config in the same dir
artifacts      ``artifacts.json``                          skip when present
generate       ``responses.jsonl`` → ``responses.parquet``  keeping the answered jobs (seeded per job)
judge          ``judged.parquet``                          the on-disk judge cache (no repeated calls)
extract        ``vectors.safetensors``, ``filter.json``    skip when present
separation     ``separation.parquet``, calibration in the  skip when present (a vector without held-out
               vector                                      calibration gets it)
steer          ``steer/answers.jsonl`` → ``steering_answers.parquet``, ``steering.parquet``, ``selection.json``,
               ``examples*.jsonl`` (chosen layer into the vector)  the answered jobs + judge cache
capability     ``capability.json``                         skip when present
report         ``report.html``, ``*.png``                  rewritten each time
summary        ``summary.json``                            rewritten each time
=============  ==========================================  ============================================

The stages are read top to bottom in the order they run, hence one module of about 460 lines.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from ..engine.remote import EndpointSampler, parse_sampler
from ..engine.sampling import run_sampling
from ..errors import PersonavecError, shown
from ..files import claim_settings, locked, read_json, refuse_other_settings, write_json, write_table
from ..judge.scoring import judge_rows
from ..judge.spec import make_judge, parse_spec, preflight_judge
from ..model.edits import Edit, steer
from ..model.loading import LoadedModel, load_model, model_shape
from ..model.projection import column, project_pairs
from ..run.artifacts import TraitArtifacts, builtin, builtin_traits, generate_artifacts, load_artifacts
from ..stats import auroc, bootstrap, cohens_d, finite_or_none
from ..vectors.calibration import HELD_OUT, calibrate
from ..vectors.extraction import extract_vector
from ..vectors.vector import PersonaVector
from ..version import __version__
from .config import RunConfig, model_slug

log = logging.getLogger(__name__)
JUDGE_MIN_AUROC = 0.75  # --filter auto: below this the judge's trait scores barely tell pos from neg answers
MIN_PAIRS = 10


class Run:
    """One run directory and the lazily loaded models its stages need."""

    def __init__(self, cfg: RunConfig, out_root: str | os.PathLike = "runs", run_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> None:
        if not isinstance(cfg, RunConfig):
            raise PersonavecError(f"Run takes a RunConfig, e.g. Run(RunConfig(trait=\"evil\")), not {shown(cfg)}")
        self.cfg = cfg
        self.progress = progress
        self.dir = Path(run_dir) if run_dir else Path(out_root) / model_slug(cfg.model) / cfg.trait
        self._lm: LoadedModel | None = None
        self._judges: dict[tuple[str, str | None], Any] = {}  # built judges by (spec, base URL)
        self.timings: dict[str, float] = {}
        self.command: str | None = None  # the command line that reproduces this run, for the report
        self._art: TraitArtifacts | None = None  # artifacts made by the preflight, saved once the run is claimed
        self._sampler: Any = None
        self._eval_gave_up: dict[tuple[str, str | None], str] = {}  # experiments' judges that gave up, and why

    # ---- models ----
    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            self._lm = load_model(self.cfg.model, device=self.cfg.device, dtype=self.cfg.dtype,
                                  revision=self.cfg.revision)
        return self._lm

    def path(self, name: str) -> Path:
        return self.dir / name

    @contextmanager
    def locked(self) -> Iterator[None]:
        """This process alone writes the run directory while the block runs (re-entrant)."""
        with locked(self.dir, "this run (--out or --run-dir)"):
            yield

    # ---- stages ----
    REFUSAL_TODO = "pass --out or --run-dir to start a new run elsewhere, or delete that directory"

    def preflight(self) -> None:
        """Every check that can fail at the start, before anything is written: the directory's recorded settings,
        the judge endpoint, and the artifacts (read, or generated; saved once the run is claimed)."""
        refuse_other_settings(self.path("run.json"), self.identity(), "a run", self.REFUSAL_TODO, key="config")
        n_layers = model_shape(self.cfg.model, self.cfg.revision)[0]  # the model exists (its config, no weights)
        if self.cfg.steer_layers and not self.path("selection.json").exists():
            bad = [x for x in self.cfg.steer_layers if not 0 <= x <= n_layers]
            if bad:
                raise PersonavecError(f"steering layer {bad[0]} (--steer-layers) is out of range: {self.cfg.model} "
                                      f"has layers 0..{n_layers}")
            if 0 in self.cfg.steer_layers:  # found only at the steer stage, after every answer was sampled and judged
                raise PersonavecError(f"steering layer 0 (--steer-layers) is the embeddings' output, where a vector "
                                      f"has no direction (its row 0 is zero); steer at layers 1..{n_layers}")
        if self.cfg.mc_path and not self.path("capability.json").exists():
            from ..steering.capability import read_mmlu

            try:
                read_mmlu(self.cfg.mc_path)
            except PersonavecError as e:
                raise PersonavecError(f"the multiple-choice data (--mmlu, mc_path): {e}") from None
        if not self.path("judged.parquet").exists():  # the run's judge still has answers to score
            preflight_judge(self.cfg.judge, self.cfg.judge_base_url)
        parse_spec(self.eval_judge_spec)  # the experiments' judge is at least a judge
        if self.sampler() is not None and self.cfg.sampler_check and not self.path("responses.parquet").exists():
            self.sampler().check_same_model(self.lm)
        if not self.path("artifacts.json").exists():
            self._art = self.make_artifacts()

    def identity(self) -> dict[str, Any]:
        """The settings compared with this directory's ``run.json``: a run recorded before the steering grid had
        units (no ``steer_units``) steered a raw grid, so it continues with ``--steer-units raw`` and is refused,
        saying so, with norm units."""
        ident = self.cfg.identity()
        recorded = read_json(self.path("run.json")) if self.path("run.json").exists() else None
        config = recorded.get("config") if isinstance(recorded, dict) else None
        if isinstance(config, dict) and "steer_units" not in config:
            if ident["steer_units"] != "raw":
                raise PersonavecError(f"{self.dir} holds a run made before the steering grid had units (its "
                                      f"coefficients are multiples of the vector): pass --steer-units raw to continue "
                                      f"it, or {self.REFUSAL_TODO}")
            ident.pop("steer_units")
        return ident

    def write_config(self) -> None:
        claim_settings(self.path("run.json"), self.identity(), "a run", self.REFUSAL_TODO, key="config",
                       extra={"personavec": __version__, "torch": torch.__version__,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "batch": self.batch_note()})

    def batch_note(self) -> dict[str, Any]:
        """Whether this run's answers are independent of the batch they shared (see README, "Batch dependence"):
        only one row at a time is that by construction; float32 nearly always, bfloat16 often not."""
        dtype = self.cfg.resolved_dtype()
        invariant = self.cfg.sampling.batch_size == 1
        note = ("one row at a time: answers do not depend on a batch" if invariant else
                "in float32 an answer rarely depends on what shared its batch (kernels may round other batch shapes "
                "differently in the last bit)" if dtype == "float32" else
                f"in {dtype} an answer can depend on what shared its batch (kernels round other batch shapes "
                "differently); pass --dtype float32, and --gen-batch-size 1 for answers reproducible token for token")
        return {"dtype": dtype, "dtype_setting": self.cfg.dtype or "auto", "batch_size": self.cfg.sampling.batch_size,
                "batch_invariant": invariant, "note": note}

    def artifacts(self) -> TraitArtifacts:
        p = self.path("artifacts.json")
        if p.exists():
            return TraitArtifacts.load(p)
        art = self._art or self.make_artifacts()
        art.save(p)
        return art

    def make_artifacts(self) -> TraitArtifacts:
        """The run's artifacts from --artifacts, the built-in set, or the generator (nothing is written)."""
        cfg = self.cfg
        if cfg.artifacts_path:
            art = load_artifacts(cfg.artifacts_path, cfg.eval_artifacts_path, name=cfg.trait).validate()
        elif cfg.eval_artifacts_path:
            raise PersonavecError("--eval-artifacts needs --artifacts (the official extraction file)")
        elif cfg.trait in builtin_traits() and not cfg.generator:
            art = builtin(cfg.trait)
        elif cfg.description and cfg.generator:
            from ..run.writers import make_generator

            gen = make_generator(cfg.generator, base_url=cfg.generator_base_url)
            art = generate_artifacts(gen, cfg.trait, cfg.description)
        elif cfg.description:
            raise PersonavecError(f"trait {cfg.trait!r} is not built in: pass --generator openai:MODEL (or "
                                  "local:MODEL) to write its artifacts, or --artifacts FILE")
        else:
            art = builtin(cfg.trait)  # raises the 'unknown trait' message
        return art

    def jobs(self, art: TraitArtifacts) -> list[dict[str, Any]]:
        lm = self.lm
        n = self.cfg.sampling.n_samples
        jobs: list[dict[str, Any]] = []
        for side in ("pos", "neg"):
            systems = art.system_prompts(side)
            for i, system in enumerate(systems):
                for q, question in enumerate(art.extraction_questions):
                    for s in range(n):
                        jobs.append({"set": "extract", "side": side, "instruction_id": i, "question_id": q,
                                     "sample_id": s, "system": system, "question": question,
                                     "prompt": lm.format_chat(question, system=system)})
            for q, question in enumerate(art.evaluation_questions):
                for s in range(self.cfg.eval_samples):
                    i = (q + s) % len(systems)
                    jobs.append({"set": "eval", "side": side, "instruction_id": i, "question_id": q,
                                 "sample_id": s, "system": systems[i], "question": question,
                                 "prompt": lm.format_chat(question, system=systems[i])})
        return jobs

    def generate(self, art: TraitArtifacts) -> pd.DataFrame:
        out = self.path("responses.parquet")
        if out.exists():
            df = pd.read_parquet(out)
            if "job" in df.columns and df["job"].is_unique and sorted(df["job"]) == list(range(len(df))):
                return df
            log.warning("%s does not hold one answer per job; rebuilding it from responses.jsonl", out)
        rows = run_sampling(self.lm, self.jobs(art), self.cfg.sampling, self.path("responses.jsonl"),
                            sampler=self.sampler(),
                            progress="sampling" if self.progress else False)
        df = pd.DataFrame(rows)
        write_table(df, out)
        return df

    @property
    def eval_judge_spec(self) -> str:
        """The judge of the experiments' answers: ``--eval-judge``, else the run's ``--judge``."""
        return self.cfg.eval_judge or self.cfg.judge

    def _eval_base_url(self) -> str | None:
        return self.cfg.eval_judge_base_url or self.cfg.judge_base_url

    def eval_judge(self) -> Any:
        """The experiments' judge (an endpoint is checked with one request when it is first built)."""
        return self.judge(self.eval_judge_spec, self._eval_base_url(), preflight=True)

    def judge_experiment(self, rubric: str, answers: pd.DataFrame, desc: str = "judging") -> pd.DataFrame:
        """An experiment's ``answers`` with ``trait`` and ``coherence`` from the experiments' judge, under the run's
        give-up rule: a judge that scored none of the first answers it was shown — the run's extraction answers
        when it is the run's judge, or an earlier experiment's in this process — is not asked about these, and
        ``attrs["judge_note"]`` says so (as it does when it gives up on these)."""
        key = (self.eval_judge_spec, self._eval_base_url())
        note = self._eval_gave_up.get(key)
        if note is None and key == (self.cfg.judge, self.cfg.judge_base_url) and self.judge_note():
            note = f"the run's judge ({self.judge_note()})"
        if note is not None:
            rows = judge_rows(None, rubric, answers)
            rows.attrs["judge_note"] = (f"{self.eval_judge_spec} was not asked about these {len(answers)} answers: "
                                        f"{note}")
            return rows
        rows = judge_rows(self.eval_judge(), rubric, answers, progress=self.progress, desc=desc)
        if rows.attrs.get("judge_note"):
            self._eval_gave_up[key] = f"earlier in this experiment {rows.attrs['judge_note']}"
            log.warning("%s: %s", self.eval_judge_spec, rows.attrs["judge_note"])
        return rows

    def judge(self, spec: str | None = None, base_url: str | None = None, preflight: bool = False) -> Any:
        """The judge for ``spec`` (default: the run's ``--judge``, checked by :meth:`preflight`), built once per run;
        None for ``none``. A local judge on the run's own model shares it."""
        if spec is None:
            spec, base_url = self.cfg.judge, self.cfg.judge_base_url
        if (spec, base_url) not in self._judges:
            self._judges[(spec, base_url)] = make_judge(spec, base_url, concurrency=self.cfg.judge_concurrency,
                                                        preflight=preflight, load=self._model_for)
        return self._judges[(spec, base_url)]

    def sampler(self) -> Any:
        """The endpoint that samples the contrastive answers (``--sampler openai:MODEL``), or None (local)."""
        model = parse_sampler(self.cfg.sampler)
        if model is None:
            return None
        if self._sampler is None:
            self._sampler = EndpointSampler(model, self.cfg.sampler_base_url, self.cfg.sampler_concurrency)
        return self._sampler

    def steer_sampler(self, vec: PersonaVector, grid: Any) -> Any:
        """The endpoint that samples the steered grid too: the sampler endpoint when it is a vLLM server with
        personavec's plugin serving this run's vector under the trait's name (checked row for row, every cell's
        edit within the server's bounds, and a steered probe unless ``--no-sampler-check``); otherwise None
        (local), said in one line. A server serving another vector under that name is refused."""
        from ..engine.remote import NoPlugin, PluginEdits
        from ..steering.grid import cells, grid_edit

        sampler = self.sampler()
        if sampler is None:
            return None
        name, config = self.cfg.trait, sampler.client.config
        try:
            plugin = PluginEdits(config.base_url, {name: vec}, api_key=config.api_key)
        except NoPlugin as e:
            log.warning("steered answers: sampled locally (%s; with the plugin serving %s=%s they are sampled "
                        "there)", e, name, self.path("vectors.safetensors"))
            return None
        edits = [grid_edit(vec, grid, layer, coef) for layer, coef in cells(grid) if layer >= 0]
        why = plugin.fits(edits)
        if why is not None:
            log.warning("steered answers: sampled locally (%s)", why)
            return None
        steered = sampler.with_edits(plugin)
        if self.cfg.sampler_check and edits:
            steered.check_same_model(self.lm, [max(edits, key=lambda e: e.coef)])
        log.info("steered answers: sampled by %s with personavec's plugin (vector %r checked)", sampler.name, name)
        return steered

    def _model_for(self, spec: str) -> LoadedModel:
        if spec == self.cfg.model:
            return self.lm
        return load_model(spec, device=self.cfg.device, dtype=self.cfg.dtype)

    def score(self, art: TraitArtifacts, responses: pd.DataFrame) -> pd.DataFrame:
        out = self.path("judged.parquet")
        if out.exists():
            return pd.read_parquet(out)
        df = responses.copy()
        judge = self.judge()
        ext = df["set"] == "extract"
        df["trait"] = float("nan")
        df["coherence"] = float("nan")
        if judge is None:
            log.warning("--judge none: answers are not scored and the filter is skipped")
        scored = judge_rows(judge, art.rubric, df[ext], progress=self.progress, desc="judging")
        note = scored.attrs.get("judge_note")
        if note:
            log.warning("%s", note)
        df.loc[ext, ["trait", "coherence"]] = scored[["trait", "coherence"]].to_numpy()
        df["judge"] = judge.name if judge is not None else "none"
        write_json(self.path("judge.json"), {"judge": df["judge"].iloc[0], "gave_up": bool(note), "note": note})
        write_table(df, out)
        return df

    def judge_note(self) -> str | None:
        """Why the run's judge was not asked about every answer (it scored none of the first ones), if it was not."""
        p = self.path("judge.json")
        return read_json(p).get("note") if p.exists() else None

    def extract(self, judged: pd.DataFrame) -> PersonaVector:
        out = self.path("vectors.safetensors")
        if out.exists():
            return PersonaVector.load(out)
        ext = judged[judged["set"] == "extract"]
        key = ["instruction_id", "question_id", "sample_id"]
        pos = ext[ext["side"] == "pos"].sort_values(key).reset_index(drop=True)
        neg = ext[ext["side"] == "neg"].sort_values(key).reset_index(drop=True)
        if not pos[key].equals(neg[key]):
            raise PersonavecError(f"{self.path('judged.parquet')}: pos and neg rows do not pair up; delete it and "
                                  "responses.parquet, then run the same command again (the answers are kept in "
                                  "responses.jsonl and the scores in the judge cache)")
        decision = self.filter_decision(pos, neg)
        apply = decision["applied"]
        nonempty = (pos["answer"].str.strip() != "") & (neg["answer"].str.strip() != "")
        if not apply and not nonempty.all():
            log.warning("dropping %d pairs with an empty answer", int((~nonempty).sum()))
            pos, neg = pos[nonempty].reset_index(drop=True), neg[nonempty].reset_index(drop=True)
        vec = extract_vector(self.lm, pos, neg, trait="trait", filter_config=self.cfg.filter, apply_filter=apply,
                             batch_size=self.cfg.batch_size, progress=self.progress, calibrate=False)
        vec.trait = self.cfg.trait
        vec.filter.update(decision)
        vec.extra.update(judge=str(judged["judge"].iloc[0]), run_dir=str(self.dir))
        write_json(self.path("filter.json"), {"counts": vec.counts, "thresholds": self.cfg.filter.to_dict(),
                                                **decision})
        vec.save(out)
        return vec

    def filter_decision(self, pos: pd.DataFrame, neg: pd.DataFrame) -> dict[str, Any]:
        """Whether to apply the paper's filter, and why.

        ``--filter on`` always applies it and ``off`` never does. ``auto`` (default) applies it when the judge
        can tell the eliciting answers from the suppressing ones — AUROC of its trait scores, pos vs neg, at
        least ``JUDGE_MIN_AUROC`` — and at least ``MIN_PAIRS`` pairs survive; otherwise every pair is used and
        the summary says so loudly. A weak judge (such as the 135M embedded model judging itself) only adds
        noise to the filter.
        """
        from ..vectors.tables import paired_filter

        mode = self.cfg.filter_mode
        if self.cfg.judge == "none":
            return {"applied": False, "mode": mode, "reason": "no judge (--judge none)"}
        ps = torch.tensor(pd.to_numeric(pos["trait"], errors="coerce").to_numpy(), dtype=torch.float64)
        ns = torch.tensor(pd.to_numeric(neg["trait"], errors="coerce").to_numpy(), dtype=torch.float64)
        ps, ns = ps[~ps.isnan()], ns[~ns.isnan()]
        enough = min(len(ps), len(ns)) >= MIN_PAIRS  # an AUROC over a handful of scores means nothing
        judge_auroc = auroc(ps, ns) if enough else float("nan")
        would_keep = paired_filter(pos, neg, "trait", self.cfg.filter).counts["kept"]
        info = {"mode": mode, "judge_auroc": judge_auroc, "judge_missing": int(len(pos) + len(neg) - len(ps) - len(ns)),
                "paper_filter_keeps": would_keep}
        if mode == "on":
            return {"applied": True, "reason": "--filter on", **info}
        if mode == "off":
            return {"applied": False, "reason": "--filter off", **info}
        if not enough:
            return {"applied": False, "reason": f"the judge gave a usable trait score for only {len(ps)} pos and "
                                                f"{len(ns)} neg answers (the rest were below {0.25} probability "
                                                "mass on 0-100); all pairs used", **info}
        if not judge_auroc >= JUDGE_MIN_AUROC:
            return {"applied": False, "reason": f"the judge cannot tell pos from neg answers (trait-score AUROC "
                                                f"{judge_auroc:.2f} < {JUDGE_MIN_AUROC}); all pairs used", **info}
        if would_keep < MIN_PAIRS:
            return {"applied": False, "reason": f"the paper's filter keeps only {would_keep} pairs (< {MIN_PAIRS}); "
                                                "all pairs used", **info}
        return {"applied": True, "reason": "judge separates pos from neg", **info}

    def separation(self, judged: pd.DataFrame, vec: PersonaVector) -> pd.DataFrame:
        """Per layer: AUROC and Cohen's d of response-average projections, pos vs neg held-out answers, with 95 %
        bootstrap intervals resampling the evaluation questions; and the vector's calibration (quantiles of the
        meter's per-token readings of the same answers, see :mod:`personavec.vectors.calibration`), added to a
        vector that lacks it when the stage runs again."""
        out = self.path("separation.parquet")
        ev = judged[judged["set"] == "eval"].reset_index(drop=True)
        ev = ev[ev["answer"].str.strip() != ""].reset_index(drop=True)
        if len(ev) and vec.extra.get("calibration", {}).get("source") != HELD_OUT:
            calibrate(self.lm, vec, ev["prompt"].tolist(), ev["answer"].tolist(), ev["side"].tolist(), held_out=True,
                      batch_size=self.cfg.batch_size, progress="calibration" if self.progress else False)
            vec.save(self.path("vectors.safetensors"))
        if out.exists():
            return pd.read_parquet(out)
        layers = list(range(vec.n_layers + 1))
        rows = vec.tensors["response_avg"]  # [L+1, d]
        table = project_pairs(self.lm, ev["prompt"].tolist(), ev["answer"].tolist(),
                              {"v": {layer: rows[layer] for layer in layers}}, batch_size=self.cfg.batch_size,
                              progress="separation" if self.progress else False)
        proj = torch.tensor([column(table, len(ev), "v", layer) for layer in layers]).T  # [n, L+1]
        is_pos = torch.tensor((ev["side"] == "pos").to_numpy())
        questions = ev["question_id"].tolist() if "question_id" in ev else list(range(len(ev)))
        rows = []
        for layer in layers:
            x = proj[:, layer]
            a_lo, a_hi = bootstrap(lambda i, x=x: auroc(x[i][is_pos[i]], x[i][~is_pos[i]]), questions,
                                   seed=self.cfg.sampling.seed)
            d_lo, d_hi = bootstrap(lambda i, x=x: cohens_d(x[i][is_pos[i]], x[i][~is_pos[i]]), questions,
                                   seed=self.cfg.sampling.seed)
            rows.append({"layer": layer, "auroc": auroc(x[is_pos], x[~is_pos]), "auroc_lo": a_lo, "auroc_hi": a_hi,
                         "cohens_d": cohens_d(x[is_pos], x[~is_pos]), "cohens_d_lo": d_lo, "cohens_d_hi": d_hi,
                         "pos_mean": float(x[is_pos].mean()), "neg_mean": float(x[~is_pos].mean()),
                         "n_pos": int(is_pos.sum()), "n_neg": int((~is_pos).sum()),
                         "n_questions": len(set(questions)), "norm": vec.norms()[layer]})
        df = pd.DataFrame(rows)
        write_table(df, out)
        return df

    def grid(self, n_layers: int) -> Any:
        from dataclasses import replace

        from ..steering.grid import default_grid

        g = default_grid(n_layers, quick=self.cfg.quick, units=self.cfg.steer_units)
        g = replace(g, seed=self.cfg.sampling.seed, batch_size=self.cfg.sampling.batch_size,
                    n_samples=1 if self.cfg.quick else self.cfg.sampling.n_samples,
                    max_new_tokens=min(g.max_new_tokens, self.cfg.sampling.max_new_tokens))
        if self.cfg.steer_layers:
            g = replace(g, layers=sorted(set(self.cfg.steer_layers)))
        if self.cfg.steer_coefs:
            g = replace(g, coefs=sorted(set(self.cfg.steer_coefs) | {0.0}))
        return replace(g, units=self.cfg.steer_units)

    def steer_and_select(self, art: TraitArtifacts, vec: PersonaVector) -> dict[str, Any] | None:
        """Steered evaluation grid, judged, projected and read for fluency and repetition; the choice (or "no
        defensible choice") goes into the vector's metadata."""
        from ..steering.grid import project_rows, read_quality, steered_answers, summarize
        from ..steering.selection import choose

        if not self.cfg.select:
            return None
        sel_path = self.path("selection.json")
        if sel_path.exists():
            return read_json(sel_path)
        grid = self.grid(vec.n_layers)
        answers_path = self.path("steering_answers.parquet")
        if answers_path.exists():
            df = pd.read_parquet(answers_path)
        else:
            df = steered_answers(self.lm, art.evaluation_questions, vec, grid, self.path("steer"),
                                 progress=self.progress, sampler=self.steer_sampler(vec, grid))
            # a judge that could score none of the run's answers is not asked about the steered ones either
            judge = None if self.judge_note() else self.judge()
            df = judge_rows(judge, art.rubric, df, progress=self.progress, desc="judging steered")
            df = project_rows(self.lm, vec, df, batch_size=self.cfg.batch_size)
            df = read_quality(self.lm, df, batch_size=self.cfg.batch_size)
            write_table(df, answers_path)
        if "fluency" not in df:  # answers stored by an older version: read them now
            df = read_quality(self.lm, df, batch_size=self.cfg.batch_size)
            write_table(df, answers_path)
        table = summarize(df, grid.layers, seed=grid.seed)
        write_table(table, self.path("steering.parquet"))
        sep = pd.read_parquet(self.path("separation.parquet"))
        gaps = {int(r.layer): float(r.pos_mean - r.neg_mean) for r in sep.itertuples()}
        sel = choose(table, coherence_min=self.cfg.coherence_min, gaps=gaps)
        result = {**sel.to_dict(), "units": grid.units, "grid": grid.to_dict()}
        vec.chosen_layer = sel.chosen_layer
        vec.extra["selection"] = {k: v for k, v in result.items() if k not in ("effects", "unreadable")}
        vec.save(self.path("vectors.safetensors"))
        if sel.chosen_layer is not None:
            sampled, greedy = df[df["sample_id"] >= 0], df[df["sample_id"] < 0]
            write_table(self.examples(sampled, sel.chosen_layer, sel.chosen_coef), self.path("examples.jsonl"))
            if greedy.empty:  # answers stored by an older version, without the grid's greedy answers
                write_table(self.greedy_examples(art, vec, grid, sel.chosen_layer, sel.chosen_coef),
                            self.path("examples_greedy.jsonl"))
            else:
                base = self.examples(greedy, sel.chosen_layer, sel.chosen_coef)
                plain, steered = base[base["coef"] == 0.0], base[base["coef"] != 0.0]
                write_table(pd.DataFrame([{"question": a["question"], "layer": sel.chosen_layer,
                                           "coef": sel.chosen_coef, "unsteered": a["answer"],
                                           "steered": b["answer"], "unsteered_fluency": a["fluency"],
                                           "steered_fluency": b["fluency"], "unsteered_repetition": a["repetition"],
                                           "steered_repetition": b["repetition"]}
                                          for (_, a), (_, b) in zip(plain.iterrows(), steered.iterrows())]),
                            self.path("examples_greedy.jsonl"))
        write_json(sel_path, result)
        return result

    @staticmethod
    def examples(df: pd.DataFrame, layer: int, coef: float, n: int = 3) -> pd.DataFrame:
        """The first ``n`` answers unsteered and at (layer, coef), with their scores and readings."""
        rows = []
        for c in (0.0, coef):
            cell = df[df["coef"] == 0.0] if c == 0.0 else df[(df["layer"] == layer) & (df["coef"] == c)]
            first = cell.sort_values(["question_id", "sample_id"]).drop_duplicates("question_id").head(n)
            for _, r in first.iterrows():
                rows.append({"layer": layer, "coef": c, "question": r["question"], "answer": r["answer"],
                             "trait": finite_or_none(r["trait"]), "coherence": finite_or_none(r["coherence"]),
                             "fluency": finite_or_none(r.get("fluency")),
                             "repetition": finite_or_none(r.get("repetition"))})
        return pd.DataFrame(rows)

    def greedy_examples(self, art: TraitArtifacts, vec: PersonaVector, grid: Any, layer: int, coef: float,
                        n: int = 3) -> pd.DataFrame:
        """The first evaluation questions answered greedily, unsteered and steered at the chosen setting: at
        temperature 1 a small model's sampled answers are barely legible, these show the effect plainly."""
        from ..engine.sampling import SamplingConfig, generate
        from ..steering.grid import grid_edit

        questions = art.evaluation_questions[:n]
        prompts = [self.lm.format_chat(q) for q in questions]
        cfg = SamplingConfig(n_samples=1, temperature=0.0, max_new_tokens=grid.max_new_tokens)
        edit = grid_edit(vec, grid, layer, coef)
        answers = generate(self.lm, prompts * 2, cfg, edits=[[]] * len(prompts) + [[edit]] * len(prompts))
        plain, steered = answers[:len(prompts)], answers[len(prompts):]
        return pd.DataFrame([{"question": q, "layer": layer, "coef": coef, "unsteered": a["answer"],
                              "steered": b["answer"]} for q, a, b in zip(questions, plain, steered)])

    def capability(self, vec: PersonaVector, selection: dict[str, Any] | None) -> dict[str, Any] | None:
        """Multiple-choice accuracy unsteered, and at the chosen layer for each grid coefficient (unsteered only when
        the selection made no defensible choice)."""
        from ..steering.capability import builtin_mc, mc_accuracy, read_mmlu

        out = self.path("capability.json")
        if out.exists():
            return read_json(out)
        if not selection:
            return None
        questions = read_mmlu(self.cfg.mc_path) if self.cfg.mc_path else builtin_mc()
        layer = selection.get("chosen_layer")
        grid = selection["grid"]
        base = mc_accuracy(self.lm, questions)
        steered = []
        for coef in sorted(c for c in grid["coefs"] if c != 0.0 and layer is not None):
            units = grid.get("units", "raw")  # a selection made before grids had units was in raw units
            with steer(self.lm, Edit.from_vector(vec, layer, coef, units=units, positions=grid["positions"])):
                r = mc_accuracy(self.lm, questions)
            steered.append({"layer": layer, "coef": coef, "units": units, "accuracy": r.accuracy,
                            "letter_mass": r.mean_letter_mass})
        result = {"data": self.cfg.mc_path or "builtin general (40 questions)",
                  "baseline": {"accuracy": base.accuracy, "n": base.n, "letter_mass": base.mean_letter_mass},
                  "chance": sum(1 / len(q.choices) for q in questions) / max(1, len(questions)),
                  "steered": steered}
        write_json(out, result)
        return result

    #: the file whose presence means a stage is done (its recorded time is then kept, not measured again)
    STAGE_OUTPUTS: ClassVar[dict[str, str]] = {
        "artifacts": "artifacts.json", "generate": "responses.parquet", "judge": "judged.parquet",
        "extract": "vectors.safetensors", "separation": "separation.parquet", "steer": "selection.json",
        "capability": "capability.json"}

    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        self.preflight()
        with self.locked():
            self.write_config()
            return self._stages(t_start)

    def _stages(self, t_start: float) -> dict[str, Any]:
        timings_path = self.path("timings.json")
        recorded = read_json(timings_path) if timings_path.exists() else {}

        def timed(name: str, fn: Any, *a: Any) -> Any:
            done_before = self.path(self.STAGE_OUTPUTS[name]).exists()
            t0 = time.perf_counter()
            res = fn(*a)
            if not (done_before and name in recorded):
                recorded[name] = round(time.perf_counter() - t0, 2)
                write_json(timings_path, recorded)
            self.timings[name] = recorded[name]
            return res

        art = timed("artifacts", self.artifacts)
        responses = timed("generate", self.generate, art)
        judged = timed("judge", self.score, art, responses)
        vec = timed("extract", self.extract, judged)
        sep = timed("separation", self.separation, judged, vec)
        selection = timed("steer", self.steer_and_select, art, vec)
        capability = timed("capability", self.capability, vec, selection)
        best = sep.iloc[int(sep["auroc"].fillna(-1).to_numpy().argmax())]
        ext = judged[judged["set"] == "extract"]
        summary = {
            "trait": self.cfg.trait, "model": vec.model_id, "run_dir": str(self.dir),
            "judge": str(judged["judge"].iloc[0]), "artifacts_source": art.source,
            "counts": {"answers": len(judged), "extraction_answers": len(ext),
                       "eval_answers": int((judged["set"] == "eval").sum()),
                       "empty_answers": int((judged["answer"].str.strip() == "").sum()), **vec.counts},
            "mean_scores": {side: {"trait": _mean(ext[ext["side"] == side]["trait"]),
                                   "coherence": _mean(ext[ext["side"] == side]["coherence"])}
                            for side in ("pos", "neg")},
            "best_separation": {"layer": int(best["layer"]), "auroc": float(best["auroc"]),
                                "cohens_d": float(best["cohens_d"])},
            "batch": self.batch_note(),
            "stage_seconds": self.timings, "wall_seconds": round(time.perf_counter() - t_start, 1),
            "files": {"vector": str(self.path("vectors.safetensors")),
                      "responses": str(self.path("judged.parquet")),
                      "separation": str(self.path("separation.parquet"))},
        }
        if selection is not None:
            summary["selection"] = {k: selection.get(k) for k in ("chosen_layer", "chosen_coef", "suppress_coef",
                                                                  "coherence_min", "criterion", "reason",
                                                                  "defensible", "unreadable", "units", "grid")}
        if capability is not None:
            summary["capability"] = capability
        filt = read_json(self.path("filter.json"))
        summary["filter"] = filt
        if not filt.get("applied"):
            summary["warning"] = f"the paper's filter was NOT applied: {filt.get('reason')}"
        if self.judge_note():
            summary["judge_note"] = self.judge_note()
        if self.command:
            summary["command"] = self.command
        write_json(self.path("summary.json"), summary)
        from ..run.report import write_report

        summary["files"]["report"] = str(write_report(self.dir))
        write_json(self.path("summary.json"), summary)
        return summary




def _mean(s: pd.Series) -> float | None:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return round(float(s.mean()), 2) if len(s) else None
