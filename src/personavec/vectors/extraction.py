"""Persona-vector extraction from pos/neg response tables: filter, pool, difference of means."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import pandas as pd

from ..errors import PersonavecError
from ..files import read_table
from ..model.activations import POOLINGS, pooled_means
from ..model.loading import LoadedModel
from ..vectors.tables import FilterConfig, paired_filter, prompts_and_answers
from .vector import PersonaVector, mean_difference

log = logging.getLogger(__name__)

TableLike = str | os.PathLike | pd.DataFrame


def _as_frame(t: TableLike) -> tuple[pd.DataFrame, str]:
    if isinstance(t, pd.DataFrame):
        return t.reset_index(drop=True), "table"
    return read_table(t).reset_index(drop=True), str(t)


def extract_vector(lm: LoadedModel, pos: TableLike, neg: TableLike, trait: str | None = None,
                   layers: Sequence[int] | None = None, poolings: Sequence[str] = POOLINGS,
                   filter_config: FilterConfig | None = None, apply_filter: bool = True,
                   batch_size: int = 16, max_length: int | None = None, min_pairs: int = 1,
                   progress: bool = False) -> PersonaVector:
    """Extract a persona vector: per layer, mean pooled activation of kept pos rows minus kept neg rows.

    Rows are paired by position (the official filter); when score columns are present, a row pair is
    kept only if pos trait ≥ ``pos_min``, neg trait < ``neg_max`` and both are coherent.
    """
    filter_config = filter_config or FilterConfig()
    pos_df, pos_src = _as_frame(pos)
    neg_df, neg_src = _as_frame(neg)
    res = paired_filter(pos_df, neg_df, trait, filter_config, enabled=apply_filter)
    kept = res.counts["kept"]
    if kept < max(1, min_pairs):
        cfg = filter_config
        raise PersonavecError(
            f"only {kept} of {res.counts['rows']} pairs pass the filter (pos trait >= {cfg.pos_min}, "
            f"neg trait < {cfg.neg_max}, coherence >= {cfg.coherence_min}; counts {res.counts}); "
            "generate more samples, loosen the thresholds, or use --no-filter")
    if not res.applied and apply_filter:
        log.warning("no score columns found: using all %d pairs unfiltered", kept)
    pos_df, neg_df = pos_df[res.keep], neg_df[res.keep]
    p_prompts, p_answers = prompts_and_answers(pos_df, lm.tokenizer, pos_src)
    n_prompts, n_answers = prompts_and_answers(neg_df, lm.tokenizer, neg_src)
    stats = [*poolings, "response_norm"]
    pm = pooled_means(lm, p_prompts, p_answers, layers=layers, poolings=stats, batch_size=batch_size,
                      max_length=max_length, progress="pos" if progress else False)
    nm = pooled_means(lm, n_prompts, n_answers, layers=layers, poolings=stats, batch_size=batch_size,
                      max_length=max_length, progress="neg" if progress else False)
    resid_norm = ((pm.means.pop("response_norm") + nm.means.pop("response_norm")) / 2).squeeze(-1)
    counts = dict(res.counts)
    counts.update(pos_response_tokens=pm.n_response_tokens, neg_response_tokens=nm.n_response_tokens)
    return PersonaVector(
        tensors=mean_difference(pm.means, nm.means), model_id=lm.model_id, model_revision=lm.revision,
        trait=trait or "unknown", counts=counts,
        filter={"applied": res.applied, **filter_config.to_dict()}, layers=pm.layers,
        extra={"resid_norm": [round(float(x), 6) for x in resid_norm]})
