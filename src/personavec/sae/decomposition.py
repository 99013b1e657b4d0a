"""What a persona vector is made of: its SAE features, ranked, attributed exactly, explained and checked causally.

:func:`decompose` takes a :class:`~personavec.vectors.vector.PersonaVector`, a
:class:`~personavec.sae.autoencoder.SparseAutoencoder` and, optionally, a model and answers (a :class:`Corpus`:
a run's eliciting (pos) and suppressing (neg) answers, or any texts), and returns a :class:`Decomposition`:

1. **Ranking** (the paper's, appendix M): the cosine of the unit vector v̂ at the SAE's layer with every *unit*
   decoder row, both signs — the ``top`` most positive and the ``top`` most negative. The vector is never pushed
   through the encoder: a steering vector is far off the distribution the encoder was trained on (small norm, no
   typical residual around it), so its encoding is dominated by the encoder bias and says little about which
   features make it up (Mayne et al. 2024, arXiv 2411.08790); the decoder rows are what the features *write* into
   the residual stream, and their cosine with v̂ is what the direction shares with each.
2. **Attribution** on real activations (:mod:`personavec.sae.attribution`): each answer's response-average
   projection on v̂ splits exactly into ``Σ_i mean_t(a_ti)·⟨W_dec[i], v̂⟩ + ⟨b_dec, v̂⟩ + error``; averaged over
   the pos and the neg answers, each feature's share of the pos − neg gap (the bias term cancels in the gap, the
   error term does not). Features are ranked by their contribution to the gap.
3. **Per feature**: decoder cosine, mean activation on pos vs neg answers, firing rate (share of answer tokens with
   a non-zero activation), the top-activating token contexts (:mod:`personavec.sae.contexts`), and for the first
   ``causal`` features by cosine a causal check (:mod:`personavec.sae.intervention`).

:func:`write_decomposition` writes ``decomposition.json`` (everything, the settings and the SAE's provenance),
``decomposition.parquet`` (one row per feature of the SAE) and the page ``decomposition.html``
(:mod:`personavec.sae.page`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import PersonavecError, whole
from ..files import read_table, write_json, write_table
from ..model.activations import encode_for
from ..model.chat import chat_messages, conversation_pair, missing
from ..model.loading import LoadedModel
from ..vectors.vector import PersonaVector
from .attribution import Attribution, attribute, response_latents
from .autoencoder import SparseAutoencoder
from .contexts import collect_contexts
from .intervention import QUESTIONS, CausalConfig, causal_check

log = logging.getLogger(__name__)

SIDES = ("pos", "neg")


@dataclass(frozen=True)
class DecomposeConfig:
    """Settings of :func:`decompose` (defaults: the CLI's)."""

    top: int = 20  # features listed per ranking (positive cosine, negative cosine, gap)
    layer: int | None = None  # the SAE's layer when its file does not say
    contexts: int = 5  # top-activating contexts per feature card (one per answer)
    window: int = 8  # tokens shown either side of the firing token
    causal: int = 5  # the first this many features by positive cosine are checked causally (0: none)
    causal_config: CausalConfig = field(default_factory=CausalConfig)
    batch_size: int = 16

    def __post_init__(self) -> None:
        whole(self.top, "top", low=1)
        whole(self.contexts, "contexts", low=1)
        whole(self.window, "window", low=0)
        whole(self.causal, "causal", low=0)
        whole(self.batch_size, "batch_size", low=1)
        if self.layer is not None:
            whole(self.layer, "layer", low=0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Corpus:
    """Answers to attribute over: chat-formatted ``prompts``, their ``answers``, each one's side (``pos``, ``neg``
    or None), what they are (``source``), and the questions and rubric of the causal check."""

    prompts: list[str]
    answers: list[str]
    sides: list[str | None]
    source: str
    questions: list[str] = field(default_factory=list)
    rubric: str | None = None

    def __post_init__(self) -> None:
        if not (len(self.prompts) == len(self.answers) == len(self.sides)):
            raise PersonavecError(f"a corpus needs as many prompts, answers and sides; got {len(self.prompts)}, "
                                  f"{len(self.answers)} and {len(self.sides)}")
        bad = [s for s in self.sides if s not in (*SIDES, None)]
        if bad:
            raise PersonavecError(f"a side must be pos, neg or empty, not {bad[0]!r}")


@dataclass
class Decomposition:
    """The result of :func:`decompose`: ``features`` has one row per SAE latent; ``cards`` the listed features
    (ranked by positive cosine, negative cosine, then gap) with their contexts and causal readings."""

    layer: int
    vector: dict[str, Any]
    sae: dict[str, Any]
    settings: dict[str, Any]
    features: pd.DataFrame
    rankings: dict[str, list[int]]
    cards: list[dict[str, Any]]
    attribution: dict[str, Any] | None = None  # totals: projections, bias, error, the gap and its parts
    source: dict[str, Any] | None = None
    causal: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    terms: Attribution | None = field(default=None, repr=False)  # per-answer terms (not written)

    def to_json(self) -> dict[str, Any]:
        return _finite({"layer": self.layer, "vector": self.vector, "sae": self.sae, "settings": self.settings,
                        "source": self.source, "attribution": self.attribution, "rankings": self.rankings,
                        "cards": self.cards, "causal": self.causal, "notes": self.notes})


# --------------------------------------------------------------------------------------------- the core


def sae_layer(sae: SparseAutoencoder, layer: int | None) -> int:
    """The layer the SAE reads: its own, or ``layer`` when its file does not say (a different one is refused)."""
    if sae.layer is None and layer is None:
        raise PersonavecError("the SAE's file does not say which layer it reads: give --layer")
    if sae.layer is not None and layer is not None and layer != sae.layer:
        raise PersonavecError(f"the SAE reads layer {sae.layer}, not --layer {layer}: leave --layer out, or use an "
                              f"SAE for layer {layer}")
    return sae.layer if sae.layer is not None else layer  # type: ignore[return-value]


def vector_direction(vec: PersonaVector, sae: SparseAutoencoder, layer: int) -> torch.Tensor:
    """The vector's row at the SAE's layer, refused in one line when the two cannot meet."""
    if vec.hidden_size != sae.d_in:
        raise PersonavecError(f"the SAE reads vectors of size {sae.d_in} but the {vec.trait} vector has "
                              f"{vec.hidden_size} dims: use an SAE trained on the vector's model ({vec.model_id})")
    if not 0 <= layer <= vec.n_layers:
        raise PersonavecError(f"the SAE reads layer {layer} but the {vec.trait} vector has layers 0..{vec.n_layers}: "
                              "use an SAE for one of the vector's layers")
    try:
        return vec.direction(layer, "response_avg" if "response_avg" in vec.tensors else None)
    except PersonavecError as e:
        raise PersonavecError(f"the SAE reads layer {layer}, but {e}: use an SAE for one of those layers") from None


def cosine_ranking(sae: SparseAutoencoder, direction: torch.Tensor, top: int) -> tuple[torch.Tensor, list[int],
                                                                                       list[int]]:
    """``(cosines [n] float64, top positive latents, top negative latents)``: v̂ against every unit decoder row."""
    u = direction.double().flatten()
    u = u / u.norm()
    component = decoder_components(sae, u)
    norms = decoder_components(sae, None)
    cos = torch.where(norms > 0, component / norms.clamp(min=1e-300), torch.zeros_like(component))
    k = min(top, cos.numel())
    pos = cos.topk(k).indices.tolist()
    neg = (-cos).topk(k).indices.tolist()
    return cos, pos, neg


def decoder_components(sae: SparseAutoencoder, u: torch.Tensor | None, chunk: int = 8192) -> torch.Tensor:
    """``[n]`` float64 ``⟨W_dec[i], u⟩`` (``u`` None: the rows' norms), a chunk of rows at a time: an SAE of 131k
    latents over a 3584-wide stream is never copied whole into float64."""
    out = []
    for lo in range(0, sae.n_latents, chunk):
        rows = sae.W_dec[lo:lo + chunk].detach().cpu().double()
        out.append(rows.norm(dim=-1) if u is None else rows @ u)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def decompose(vec: PersonaVector, sae: SparseAutoencoder, lm: LoadedModel | None = None,
              corpus: Corpus | None = None, cfg: DecomposeConfig | None = None, judge: Any = None,
              progress: bool = False) -> Decomposition:
    """Rank, attribute, explain and check the SAE features of ``vec`` (see the module docstring). Without ``lm``
    only the ranking is made; without ``corpus`` no attribution or contexts; the causal check needs ``lm``."""
    cfg = cfg or DecomposeConfig()
    layer = sae_layer(sae, cfg.layer)
    v = vector_direction(vec, sae, layer)
    if lm is not None:
        sae.check_model(lm.n_layers, lm.hidden_size, lm.model_id)
        if layer > lm.n_layers:
            raise PersonavecError(f"the SAE reads layer {layer} but {lm.model_id} has layers 0..{lm.n_layers}")
        vec.check_shape(lm.n_layers, lm.hidden_size, lm.model_id)
    if corpus is not None and lm is None:
        raise PersonavecError("attributing over answers needs the model: pass lm")
    cos, top_pos, top_neg = cosine_ranking(sae, v, cfg.top)
    table = pd.DataFrame({"latent": np.arange(sae.n_latents), "cosine": cos.numpy(),
                          "component": decoder_components(sae, v.double() / v.double().norm()).numpy(),
                          "decoder_norm": decoder_components(sae, None).numpy()})
    table["rank_cos_pos"] = _ranks(top_pos, sae.n_latents)
    table["rank_cos_neg"] = _ranks(top_neg, sae.n_latents)
    rankings: dict[str, list[int]] = {"cosine_positive": top_pos, "cosine_negative": top_neg}
    notes: list[str] = []
    totals = source = None
    terms = None
    contexts: dict[int, list] = {}
    mean_norm = math.nan
    sides: list[str | None] = []
    if corpus is not None:
        keep = [i for i, a in enumerate(corpus.answers) if isinstance(a, str) and a.strip()]
        if len(keep) < len(corpus.answers):
            notes.append(f"{len(corpus.answers) - len(keep)} empty answers left out")
        if not keep:
            raise PersonavecError(f"{corpus.source}: no non-empty answer to attribute over")
        prompts = [corpus.prompts[i] for i in keep]
        answers = [corpus.answers[i] for i in keep]
        sides = [corpus.sides[i] for i in keep]
        lat = response_latents(lm, sae, prompts, answers, layer=layer, batch_size=cfg.batch_size,  # type: ignore
                               progress="SAE latents" if progress else False)
        terms = attribute(lat, sae, v)
        totals, gap_rank = _attribution_table(table, lat, terms, sides, cfg.top)
        rankings.update(gap_rank)
        source = {"description": corpus.source, "n_answers": len(keep),
                  "n_pos": sides.count("pos"), "n_neg": sides.count("neg"),
                  "n_tokens": int(lat.n_tokens.sum())}
        listed = _listed(rankings)
        encs = encode_for(lm, prompts, answers)  # type: ignore[arg-type]
        passed = collect_contexts(lm, sae, encs, listed, layer, k=cfg.contexts, window=cfg.window,  # type: ignore
                                  batch_size=cfg.batch_size, progress="contexts" if progress else False)
        contexts, mean_norm = passed.contexts, passed.mean_norm
    causal = None
    checked: list[int] = []
    if cfg.causal and lm is not None:
        checked = top_pos[: cfg.causal]
        resid = _resid_norm(vec, layer)
        if resid is None:
            resid = mean_norm
            notes.append(f"the vector has no resid_norm metadata: norm units read as the mean residual norm over the "
                         f"answers' tokens at layer {layer} ({mean_norm:.4g})")
        questions = (corpus.questions if corpus is not None and corpus.questions else trait_questions(vec.trait))
        rubric = corpus.rubric if corpus is not None and corpus.rubric else trait_rubric(vec.trait)
        if judge is not None and not rubric:
            notes.append(f"no rubric for trait {vec.trait!r} (no run artifacts, not a built-in trait): the judge was "
                         "not asked")
        causal = causal_check(lm, sae, checked, v, layer, questions, resid, cfg.causal_config,
                              judge=judge if rubric else None, rubric=rubric, batch_size=cfg.batch_size,
                              progress=progress)
        _causal_columns(table, causal)
    cards = _cards(table, rankings, contexts, sides, causal)
    return Decomposition(layer=layer, vector=_vector_info(vec, v, layer), sae=sae_info(sae), settings=cfg.to_dict(),
                         features=table, rankings=rankings, cards=cards, attribution=totals, source=source,
                         causal=causal, notes=notes, terms=terms)


def _ranks(order: list[int], n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    out[order] = np.arange(1, len(order) + 1)
    return out


def _attribution_table(table: pd.DataFrame, lat: Any, att: Attribution, sides: list[str | None],
                       top: int) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Adds the per-feature attribution columns to ``table``; returns the totals and the gap ranking."""
    ok = ~torch.isnan(att.projection)  # an answer cut to no tokens has no average
    masks = {"all": ok}
    for s in SIDES:
        masks[s] = ok & torch.tensor([x == s for x in sides], dtype=torch.bool)
    tokens = lat.n_tokens.double()
    totals: dict[str, Any] = {"bias": att.bias}
    for name, m in masks.items():
        n = int(m.sum())
        suffix = "" if name == "all" else f"_{name}"
        if not n:
            continue
        table[f"mean_act{suffix}"] = lat.mean_latents[m].mean(0).numpy()
        w = tokens[m]
        table[f"firing_rate{suffix}"] = ((lat.firing[m].double() * w[:, None]).sum(0) / w.sum()).numpy()
        table[f"contribution{suffix}"] = att.features[m].mean(0).numpy()
        totals[name] = {"n": n, "projection": float(att.projection[m].mean()),
                        "features": float(att.features[m].sum(1).mean()), "bias": att.bias,
                        "error": float(att.error[m].mean()),
                        "max_residual": float((att.projection[m] - att.features[m].sum(1) - att.bias
                                               - att.error[m]).abs().max())}
    rank: dict[str, list[int]] = {}
    if "pos" in totals and "neg" in totals:
        gap = table["contribution_pos"] - table["contribution_neg"]
        proj_gap = totals["pos"]["projection"] - totals["neg"]["projection"]
        table["gap"] = gap
        table["gap_share"] = gap / proj_gap if proj_gap else np.nan
        totals["gap"] = {"projection": proj_gap, "features": totals["pos"]["features"] - totals["neg"]["features"],
                         "error": totals["pos"]["error"] - totals["neg"]["error"], "bias": 0.0}
        totals["gap"]["error_share"] = totals["gap"]["error"] / proj_gap if proj_gap else None
        order = np.argsort(-gap.to_numpy(), kind="stable")
        rank["gap"] = [int(i) for i in order[:top]]
        rank["gap_against"] = [int(i) for i in np.argsort(gap.to_numpy(), kind="stable")[:top]]
        table["rank_gap"] = _ranks(rank["gap"], len(table))
    else:  # no sides: rank by the mean contribution to the projection
        order = np.argsort(-table["contribution"].to_numpy(), kind="stable")
        rank["contribution"] = [int(i) for i in order[:top]]
        table["rank_contribution"] = _ranks(rank["contribution"], len(table))
    return totals, rank


def _listed(rankings: dict[str, list[int]]) -> list[int]:
    """The features that get a card, in card order (each once; the gap's adverse end has no card)."""
    out: list[int] = []
    for key in ("cosine_positive", "cosine_negative", "gap", "contribution"):
        out += [i for i in rankings.get(key, []) if i not in out]
    return out


def _resid_norm(vec: PersonaVector, layer: int) -> float | None:
    norms = vec.extra.get("resid_norm")
    try:
        x = float(norms[layer])  # type: ignore[index]
    except (TypeError, IndexError, ValueError, KeyError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def _causal_columns(table: pd.DataFrame, causal: dict[str, Any]) -> None:
    for col in ("projection", "fluency", "trait"):
        values = np.full(len(table), np.nan)
        for name, r in causal["conditions"].items():
            if name.startswith("feature "):
                m = r[f"{col}_effect"]["mean"]
                values[int(name.split()[1])] = np.nan if m is None else m
        table[f"causal_{col}_effect"] = values


def _cards(table: pd.DataFrame, rankings: dict[str, list[int]], contexts: dict[int, list],
           sides: list[str | None], causal: dict[str, Any] | None) -> list[dict[str, Any]]:
    labels = {"cosine_positive": "cosine +", "cosine_negative": "cosine −", "gap": "gap ", "contribution": "mean "}
    cards = []
    for i in _listed(rankings):
        row = table.iloc[i]
        card = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v)) for k, v in row.items()
                if not k.startswith("rank_") and not k.startswith("causal_")}
        card["latent"] = int(i)
        card["ranks"] = [f"{labels[key]}#{rankings[key].index(i) + 1}" for key in labels if i in rankings.get(key, [])]
        card["section"] = next(key for key in labels if i in rankings.get(key, []))
        card["contexts"] = [{**c.to_dict(), "side": sides[c.row] if c.row < len(sides) else None}
                            for c in contexts.get(i, [])]
        card["causal"] = (causal or {}).get("conditions", {}).get(f"feature {i}")
        cards.append(card)
    return cards


def _vector_info(vec: PersonaVector, v: torch.Tensor, layer: int) -> dict[str, Any]:
    return {"trait": vec.trait, "model_id": vec.model_id, "model_revision": vec.model_revision, "layer": layer,
            "norm": float(v.norm()), "chosen_layer": vec.chosen_layer, "path": vec.extra.get("path")}


def sae_info(sae: SparseAutoencoder) -> dict[str, Any]:
    """The SAE's description and provenance, for the record."""
    return {"describe": sae.describe(), "activation": sae.activation, "k": sae.k, "n_latents": sae.n_latents,
            "d_in": sae.d_in, "layer": sae.layer, "hook_name": sae.hook_name, "model_id": sae.model_id,
            "apply_b_dec_to_input": sae.apply_b_dec_to_input, "provenance": sae.provenance}


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None and NumPy / torch scalars as Python numbers (JSON-safe)."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _finite(obj.item())
    return str(obj)


# --------------------------------------------------------------------------------------------- corpora


def _trait_data(trait: str) -> dict[str, Any] | None:
    try:
        p = resources.files("personavec") / "data" / "traits" / f"{trait}.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
    except (OSError, ValueError, TypeError):
        return None


def trait_questions(trait: str) -> list[str]:
    """The evaluation questions of a built-in trait, else a few general ones."""
    data = _trait_data(trait) or {}
    return list(data.get("evaluation_questions") or QUESTIONS)


def trait_rubric(trait: str) -> str | None:
    return (_trait_data(trait) or {}).get("rubric")


def corpus_from_run(run_dir: str | os.PathLike) -> Corpus:
    """A run's answers: the held-out ones (answers to the evaluation questions under the eliciting and suppressing
    system prompts, which the vector was not extracted from) where the run has them, else its extraction answers;
    the evaluation questions and rubric from its ``artifacts.json``."""
    run_dir = Path(run_dir)
    table = next((run_dir / n for n in ("judged.parquet", "responses.parquet") if (run_dir / n).is_file()), None)
    if table is None:
        raise PersonavecError(f"{run_dir} holds no judged.parquet or responses.parquet: give a run directory that "
                              "`personavec run` has sampled answers into, or --texts")
    df = read_table(table)
    need = [c for c in ("set", "side", "prompt", "answer") if c not in df.columns]
    if need:
        raise PersonavecError(f"{table} lacks column(s) {', '.join(need)}; is it a personavec run's table?")
    held = df[df["set"] == "eval"]
    which = "held-out answers to the evaluation questions (set=eval)"
    if held.empty:
        held, which = df[df["set"] == "extract"], "extraction answers (the run has no held-out ones)"
    held = held[held["side"].isin(SIDES)]
    if held.empty:
        raise PersonavecError(f"{table} holds no pos or neg answers to attribute over")
    questions: list[str] = []
    rubric = None
    art = run_dir / "artifacts.json"
    if art.is_file():
        try:
            data = json.loads(art.read_text(encoding="utf-8"))
            questions = [str(q) for q in data.get("evaluation_questions") or []]
            rubric = data.get("rubric")
        except (OSError, ValueError, AttributeError):
            log.warning("%s could not be read; the causal check uses built-in questions", art)
    return Corpus(prompts=held["prompt"].astype(str).tolist(), answers=held["answer"].fillna("").astype(str).tolist(),
                  sides=held["side"].tolist(), source=f"{table.name} of {run_dir}: {which}", questions=questions,
                  rubric=rubric)


#: the columns a texts file may hold its text in, as the error says
TEXT_COLUMNS = "'messages' (a chat ending with the assistant's answer), 'prompt' + 'answer', 'question' + 'answer', " \
               "'answer' or 'text'"


def corpus_from_texts(path: str | os.PathLike, lm: LoadedModel) -> Corpus:
    """Texts from a CSV / JSONL / Parquet file: chats (``messages``), ``prompt`` + ``answer`` (prompt already
    chat-formatted), ``question`` + ``answer``, or plain ``answer`` / ``text`` read as the answer to an empty user
    turn; an optional ``side`` column (pos / neg) gives the gap."""
    path = Path(path)
    df = read_table(path)
    cols = set(df.columns)
    if not cols & {"messages", "prompt", "answer", "text"}:
        raise PersonavecError(f"{path} has no text column (it has {', '.join(map(str, df.columns)) or 'none'}); give "
                              f"{TEXT_COLUMNS}")
    if df.empty:
        raise PersonavecError(f"{path} holds no rows")
    prompts, answers = [], []
    for i, row in enumerate(df.to_dict(orient="records")):
        if ("messages" in cols and chat_messages(row.get("messages")) is not None) or \
                ("prompt" in cols and not missing(row.get("prompt"))):
            prompt, answer = conversation_pair(row, lm.tokenizer)
        else:
            text = row.get("answer") if "answer" in cols and not missing(row.get("answer")) else row.get("text")
            question = row.get("question") if "question" in cols and not missing(row.get("question")) else ""
            prompt, answer = lm.format_chat(str(question)), None if missing(text) else str(text)
        if answer is None:
            raise PersonavecError(f"{path} row {i} has no answer text; give {TEXT_COLUMNS}")
        prompts.append(prompt)
        answers.append(answer)
    sides: list[str | None] = [None] * len(df)
    if "side" in cols:
        sides = [None if missing(s) else str(s) for s in df["side"]]
        bad = next((s for s in sides if s not in (*SIDES, None)), None)
        if bad is not None:
            raise PersonavecError(f"{path}: the side column holds {bad!r}; write pos, neg or leave it empty")
    questions = list(dict.fromkeys(str(q) for q in df["question"] if not missing(q))) if "question" in cols else []
    return Corpus(prompts=prompts, answers=answers, sides=sides, source=f"texts {path}", questions=questions)


# --------------------------------------------------------------------------------------------- files

JSON_NAME, TABLE_NAME, PAGE_NAME = "decomposition.json", "decomposition.parquet", "decomposition.html"


def write_decomposition(dec: Decomposition, out_dir: str | os.PathLike, command: str | None = None) -> dict[str, Path]:
    """Write the JSON, the table and the page into ``out_dir`` (each atomically); returns their paths."""
    from .page import render_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = dec.to_json()
    doc["command"] = command
    paths = {"json": out / JSON_NAME, "table": out / TABLE_NAME, "page": out / PAGE_NAME}
    write_table(dec.features, paths["table"])
    from ..files import write_text

    write_text(paths["page"], render_page(doc))
    write_json(paths["json"], doc)  # last: a reader (the run's report) that finds it finds the others
    return paths
