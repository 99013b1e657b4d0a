"""Persona-vector extraction from pos/neg response tables: filter, pool, difference of means."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from ..errors import PersonavecError, shown, whole
from ..files import read_table
from ..model.activations import POOLINGS, pooled_means
from ..model.loading import LoadedModel, check_loaded
from ..vectors.tables import FilterConfig, FilterResult, check_columns, check_text, paired_filter, prompts_and_answers
from .vector import PersonaVector, mean_difference

log = logging.getLogger(__name__)

TableLike = str | os.PathLike | pd.DataFrame


def _as_frame(t: TableLike) -> tuple[pd.DataFrame, str]:
    if isinstance(t, pd.DataFrame):
        return t.reset_index(drop=True), "table"
    return read_table(t).reset_index(drop=True), str(t)


@dataclass
class Pairs:
    """The pos/neg row pairs an extraction uses, chosen and checked without a model (:func:`select_pairs`)."""

    pos: pd.DataFrame  # the kept rows
    neg: pd.DataFrame
    result: FilterResult
    filter_config: FilterConfig
    pos_source: str = "pos"
    neg_source: str = "neg"


def _same_rows(pos: pd.DataFrame, neg: pd.DataFrame) -> bool:
    cols = [c for c in ("system", "question", "prompt", "answer") if c in pos.columns or c in neg.columns]
    if any(c not in pos.columns or c not in neg.columns for c in cols):
        return False
    return pos[cols].reset_index(drop=True).astype(str).equals(neg[cols].reset_index(drop=True).astype(str))


def select_pairs(pos: TableLike, neg: TableLike, trait: str | None = None, filter_config: FilterConfig | None = None,
                 apply_filter: bool = True, min_pairs: int = 1, names: tuple[str, str] = ("pos", "neg")) -> Pairs:
    """The row pairs kept by the paper's filter, every text cell checked, and pos refused when it holds the same
    answers as neg (the vector would be zero): everything an extraction can refuse before a model loads.
    ``names`` are how the two tables are called in messages (the CLI passes its flags)."""
    filter_config = filter_config or FilterConfig()
    same_file = not isinstance(pos, pd.DataFrame) and not isinstance(neg, pd.DataFrame) and \
        os.path.realpath(pos) == os.path.realpath(neg)
    if same_file:
        raise PersonavecError(f"{names[0]} and {names[1]} are the same file ({pos}): the vector, the difference of "
                              f"their means, would be zero; give the answers that show the trait as {names[0]} and "
                              f"those that do not as {names[1]}")
    pos_df, pos_src = _as_frame(pos)
    neg_df, neg_src = _as_frame(neg)
    for df, src in ((pos_df, pos_src), (neg_df, neg_src)):
        check_columns(df, src)
    res = paired_filter(pos_df, neg_df, trait, filter_config, enabled=apply_filter)
    kept = res.counts["kept"]
    if kept < max(1, min_pairs):
        cfg = filter_config
        raise PersonavecError(
            f"only {kept} of {res.counts['rows']} pairs pass the filter (pos trait >= {cfg.pos_min}, "
            f"neg trait < {cfg.neg_max}, coherence >= {cfg.coherence_min}; counts {res.counts}); "
            "generate more samples, loosen the thresholds, or use --no-filter")
    pos_df, neg_df = pos_df[res.keep], neg_df[res.keep]
    check_text(pos_df, pos_src)  # a bad cell named by its row in the table, whatever the filter dropped before it
    check_text(neg_df, neg_src)
    pos_df, neg_df = pos_df.reset_index(drop=True), neg_df.reset_index(drop=True)
    if _same_rows(pos_df, neg_df):
        raise PersonavecError(f"{names[0]} ({pos_src}) and {names[1]} ({neg_src}) hold the same prompts and answers: "
                              "the vector, the difference of their means, would be zero; give the answers that show "
                              f"the trait as {names[0]} and those that do not as {names[1]}")
    return Pairs(pos_df, neg_df, res, filter_config, pos_src, neg_src)


def extract_vector(lm: LoadedModel, pos: TableLike | Pairs, neg: TableLike | None = None, trait: str | None = None,
                   layers: Sequence[int] | None = None, poolings: Sequence[str] = POOLINGS,
                   filter_config: FilterConfig | None = None, apply_filter: bool = True,
                   batch_size: int = 16, max_length: int | None = None, min_pairs: int = 1,
                   progress: bool = False, calibrate: bool = True) -> PersonaVector:
    """Extract a persona vector: per layer, mean pooled activation of kept pos rows minus kept neg rows.

    Rows are paired by position (the official filter); when score columns are present, a row pair is
    kept only if pos trait ≥ ``pos_min``, neg trait < ``neg_max`` and both are coherent. ``pos`` may be the
    :class:`Pairs` of an earlier :func:`select_pairs` (then ``neg`` and the filter settings are not given).
    ``layers``: the layers to compute (None: all); an empty list is refused (it would give a zero vector).
    With ``calibrate`` the vector records the meter's readings of the same answers (``extra["calibration"]``,
    labelled not held out; see :mod:`personavec.vectors.calibration`).
    """
    check_loaded(lm, "extract_vector")
    if trait is not None and not isinstance(trait, str):
        raise PersonavecError(f"extract_vector's trait must be a string (the column of trait scores), not "
                              f"{shown(trait)}")
    if filter_config is not None and not isinstance(filter_config, FilterConfig):
        raise PersonavecError(f"extract_vector's filter_config must be a FilterConfig, not {shown(filter_config)}")
    if isinstance(poolings, (str, bytes)) or not hasattr(poolings, "__iter__"):
        raise PersonavecError(f"extract_vector's poolings must be a list of poolings ({', '.join(POOLINGS)}), not "
                              f"{shown(poolings)}")
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise PersonavecError(f"extract_vector's layers must be a list of layer numbers, not {shown(layers)}")
        layers = [whole(x, "each of extract_vector's layers") for x in layers]
    batch_size = whole(batch_size, "extract_vector's batch_size", low=1)
    min_pairs = whole(min_pairs, "extract_vector's min_pairs", low=1)
    if max_length is not None:
        max_length = whole(max_length, "extract_vector's max_length", low=1)
    if isinstance(pos, Pairs):
        pairs = pos
    else:
        if neg is None:
            raise PersonavecError("extract_vector needs neg, the table of answers that do not show the trait")
        pairs = select_pairs(pos, neg, trait, filter_config, apply_filter, min_pairs)
    if layers is not None and not list(layers):
        raise PersonavecError("layers is empty, so no layer would be computed and the vector would be zero; name at "
                              "least one layer, or pass None for all")
    res, filter_config = pairs.result, pairs.filter_config
    kept = res.counts["kept"]
    if not res.applied and apply_filter:
        log.warning("no score columns found: using all %d pairs unfiltered", kept)
    p_prompts, p_answers = prompts_and_answers(pairs.pos, lm.tokenizer, pairs.pos_source)
    n_prompts, n_answers = prompts_and_answers(pairs.neg, lm.tokenizer, pairs.neg_source)
    stats = [*poolings, "response_norm"]
    pm = pooled_means(lm, p_prompts, p_answers, layers=layers, poolings=stats, batch_size=batch_size,
                      max_length=max_length, progress="pos" if progress else False)
    nm = pooled_means(lm, n_prompts, n_answers, layers=layers, poolings=stats, batch_size=batch_size,
                      max_length=max_length, progress="neg" if progress else False)
    resid_norm = ((pm.means.pop("response_norm") + nm.means.pop("response_norm")) / 2).squeeze(-1)
    counts = dict(res.counts)
    counts.update(pos_response_tokens=pm.n_response_tokens, neg_response_tokens=nm.n_response_tokens)
    vec = PersonaVector(
        tensors=mean_difference(pm.means, nm.means), model_id=lm.model_id, model_revision=lm.revision,
        trait=trait or "unknown", counts=counts,
        filter={"applied": res.applied, **filter_config.to_dict()}, layers=pm.layers,
        extra={"resid_norm": [round(float(x), 6) for x in resid_norm]})
    if calibrate:
        from .calibration import calibrate as calibrate_vector

        calibrate_vector(lm, vec, [*p_prompts, *n_prompts], [*p_answers, *n_answers],
                         ["pos"] * len(p_answers) + ["neg"] * len(n_answers), held_out=False, batch_size=batch_size,
                         progress="calibration" if progress else False)
    return vec
