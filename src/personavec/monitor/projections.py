"""Projections of conversations on persona vectors, in a file.

:func:`project_file`: for every row of a CSV / JSONL / Parquet file of conversations (a chat
``messages`` list, or ``prompt`` + ``answer``), the scalar projection a·v/‖v‖ of the pooled residual on
each vector at each requested layer and pooling, plus the cosine — several vectors and layers in ONE pass
over the model (stopped after the highest layer needed). Rows stream through in chunks; the output file
holds the input columns plus the new ones and is appended chunk by chunk, so an interrupted run resumes
after its last complete chunk and never rewrites what it wrote. The live monitor is in :mod:`.live`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import PersonavecError, shown, whole
from ..files import (
    append_text,
    check_writable,
    claim_settings,
    escape_line_ends,
    fingerprint,
    iter_chunks,
    locked,
    refuse_other_settings,
    repair_jsonl,
)
from ..model.chat import conversation_pair
from ..model.loading import LoadedModel, check_loaded
from ..model.projection import column, project_pairs
from ..vectors.probe import Probe, directions, make_probes, probe_identity
from ..vectors.vector import PersonaVector, check_named

MONITOR_POOLINGS = ("prompt_last", "response_avg", "prompt_avg")


def columns(probes: Sequence[Probe], poolings: Sequence[str]) -> list[str]:
    out = []
    for p in probes:
        for layer in p.layers:
            for pool in poolings:
                out += [f"{p.name}@L{layer}:{pool}", f"{p.name}@L{layer}:{pool}:cos"]
    return out


def project_rows(lm: LoadedModel, rows: Sequence[dict[str, Any]], probes: Sequence[Probe],
                 poolings: Sequence[str] = MONITOR_POOLINGS, batch_size: int = 16,
                 max_length: int | None = None) -> pd.DataFrame:
    """Projection and cosine columns for ``rows`` (one model pass for all probes, layers and poolings)."""
    check_probes(lm, probes)
    pairs = [conversation_pair(r, lm.tokenizer) for r in rows]
    table = project_pairs(lm, [p for p, _ in pairs], [a or "" for _, a in pairs], directions(probes), poolings,
                          batch_size=batch_size, max_length=max_length)
    out = {}
    for p in probes:
        for layer in p.layers:
            for pool in poolings:
                for value, suffix in (("projection", ""), ("cosine", ":cos")):
                    out[f"{p.name}@L{layer}:{pool}{suffix}"] = column(table, len(rows), p.name, layer, pool, value)
    return pd.DataFrame(out, columns=columns(probes, poolings))


def check_probes(lm: LoadedModel | None, probes: Sequence[Probe]) -> None:
    """Refuse a vector made for another model (when ``lm`` is given) and a layer where a vector has no direction: a
    zero row would project everything to 0 (or NaN), silently."""
    for p in probes:
        if lm is not None:
            p.vector.check_compatible(lm)
        for layer in p.layers:
            p.vector.direction(layer, p.pooling)


def check_poolings(poolings: Sequence[str], what: str = "--pooling") -> None:
    if isinstance(poolings, str) or not isinstance(poolings, (list, tuple)):
        raise PersonavecError(f"{what} must be a list of poolings ({', '.join(MONITOR_POOLINGS)}), not "
                              f"{shown(poolings)}")
    bad = [p for p in poolings if p not in MONITOR_POOLINGS]
    if bad:
        raise PersonavecError(f"unknown pooling {shown(bad[0])} in {what}; choose from {', '.join(MONITOR_POOLINGS)}")


def project(lm: LoadedModel, conversations: Sequence[dict[str, Any]] | pd.DataFrame,
            vectors: Mapping[str, PersonaVector], layers: Sequence[int] | None = None,
            poolings: Sequence[str] = MONITOR_POOLINGS, batch_size: int = 16,
            max_length: int | None = None) -> pd.DataFrame:
    """Project conversations on persona vectors: the tidy table ``row, name, layer, pooling, projection, cosine``.

    ``conversations``: rows with a chat ``messages`` list (the last assistant turn is the answer) or a
    chat-formatted ``prompt`` and an optional ``answer``. ``vectors``: by name; each is read at ``layers``
    (default: its chosen layer). One model pass serves every vector, layer and pooling.
    """
    check_loaded(lm, "project")
    if isinstance(conversations, pd.DataFrame):
        rows = conversations.to_dict("records")
    elif isinstance(conversations, (list, tuple)) and all(isinstance(r, Mapping) for r in conversations):
        rows = list(conversations)
    else:
        bad = conversations if not isinstance(conversations, (list, tuple)) else \
            next(r for r in conversations if not isinstance(r, Mapping))
        raise PersonavecError(f"project's conversations must be a list of dicts (each with 'messages', or 'prompt' "
                              f"and 'answer') or a DataFrame, not {shown(bad)}" + (" in the list" if bad is not
                                                                                   conversations else ""))
    vectors = check_named(vectors, "project's vectors")
    if layers is not None:
        if not isinstance(layers, (list, tuple)):
            raise PersonavecError(f"project's layers must be a list of layer numbers, not {shown(layers)}")
        layers = [whole(x, "project's layers", low=0) for x in layers]
    check_poolings(poolings, "project's poolings")
    batch_size = whole(batch_size, "project's batch_size", low=1)
    if max_length is not None:
        max_length = whole(max_length, "project's max_length", low=1)
    probes = make_probes(vectors, layers)
    check_probes(lm, probes)
    pairs = [conversation_pair(r, lm.tokenizer) for r in rows]
    return project_pairs(lm, [p for p, _ in pairs], [a or "" for _, a in pairs], directions(probes), poolings,
                         batch_size=batch_size, max_length=max_length)


def projection_settings(path: str | os.PathLike, probes: Sequence[Probe], poolings: Sequence[str], model_id: str,
                        max_length: int | None) -> dict[str, Any]:
    """What defines a projection file's columns and values (its rows are appended over several calls)."""
    return {"input": fingerprint(path), "model": model_id, "probes": probe_identity(probes),
            "poolings": list(poolings), "max_length": max_length}


def settings_path(out: Path) -> Path:
    return out.with_suffix(".settings.json")


def check_projection(path: str | os.PathLike, probes: Sequence[Probe], out: str | os.PathLike,
                     poolings: Sequence[str], model_id: str, max_length: int | None) -> dict[str, Any]:
    """Refuse, before any work or write, an input that is missing, unknown poolings, or an output holding
    projections of other settings; returns the settings to claim."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise PersonavecError(f"{path} does not exist")
    if out.suffix.lower() != ".jsonl":
        raise PersonavecError("write projections to a .jsonl file (it is appended chunk by chunk)")
    bad = [p for p in poolings if p not in MONITOR_POOLINGS]
    if bad:
        raise PersonavecError(f"unknown pooling {bad[0]!r}; choose from {', '.join(MONITOR_POOLINGS)}")
    check_probes(None, probes)
    settings = projection_settings(path, probes, poolings, model_id, max_length)
    if out.exists() and out.stat().st_size and not settings_path(out).exists():
        raise PersonavecError(f"{out} holds rows but no record of their settings ({settings_path(out).name}); "
                              "delete it or write to another --out")
    refuse_other_settings(settings_path(out), settings, "projections", "use another --out, or delete both files to "
                          "start over", where=out)
    check_writable(out)
    return settings


def project_file(lm: LoadedModel, path: str | os.PathLike, probes: Sequence[Probe], out: str | os.PathLike,
                 poolings: Sequence[str] = MONITOR_POOLINGS, chunk_rows: int = 256, batch_size: int = 16,
                 progress: bool = False, max_length: int | None = None) -> Path:
    """Project every row of ``path``; write input columns + projections to ``out`` (JSONL), resumably.

    The settings (input, model, vectors and layers, poolings, max length) are recorded beside the output in
    ``<out>.settings.json``; a later call with other settings is refused instead of appending rows that do not
    belong under the same columns.
    """
    path, out = Path(path), Path(out)
    settings = check_projection(path, probes, out, poolings, lm.model_id, max_length)
    with locked(out, "the projections", is_dir=False):
        claim_settings(settings_path(out), settings, "projections", where=out)
        done = repair_jsonl(out)
        from tqdm.auto import tqdm

        bar = tqdm(desc="projecting", unit="row", disable=not progress, initial=done)
        seen = 0
        with open(out, "a", encoding="utf-8") as f:
            for chunk in iter_chunks(path, chunk_rows):
                start, seen = seen, seen + len(chunk)
                if seen <= done:
                    continue
                chunk = chunk.iloc[max(0, done - start):].reset_index(drop=True)
                proj = project_rows(lm, chunk.to_dict("records"), probes, poolings, batch_size, max_length)
                merged = pd.concat([chunk, proj], axis=1)
                append_text(f, escape_line_ends(merged.to_json(orient="records", lines=True, force_ascii=False,
                                                                default_handler=str)))
                bar.update(len(chunk))
        bar.close()
    return out
