"""Monitoring with persona vectors: projections of conversations, and a live per-token monitor.

Projections (:func:`project_file`): for every row of a CSV / JSONL / Parquet file of conversations (a chat
``messages`` list, or ``prompt`` + ``answer``), the scalar projection a·v/‖v‖ of the pooled residual on
each vector at each requested layer and pooling, plus the cosine — several vectors and layers in ONE pass
over the model (stopped after the highest layer needed). Rows stream through in chunks; the output file
holds the input columns plus the new ones and is appended chunk by chunk, so an interrupted run resumes
after its last complete chunk and never rewrites what it wrote.

Live (:class:`LiveMonitor`): during ``generate``, the projection of the newest position at one layer,
reported per generated token to a callback; above a threshold it can stop generation or switch on
suppressive steering for the rest of the answer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..errors import PersonavecError
from ..files import (
    append_text,
    check_writable,
    claim_settings,
    fingerprint,
    locked,
    read_table,
    refuse_other_settings,
    repair_jsonl,
)
from ..model.activations import encode_for, iter_pooled
from ..model.layers import capture, decoder_layers, edit
from ..model.loading import LoadedModel
from ..model.projection import unit
from ..vectors.tables import chat_messages, missing
from ..vectors.vector import PersonaVector

MONITOR_POOLINGS = ("prompt_last", "response_avg", "prompt_avg")


@dataclass(frozen=True)
class Probe:
    """One vector at some layers, named for its output columns ``{name}@L{layer}:{pooling}``."""

    name: str
    vector: PersonaVector
    layers: tuple[int, ...]
    pooling: str | None = None  # which of the vector's poolings to project on (default: its default)

    def unit(self, layer: int) -> torch.Tensor:
        return unit(self.vector.get(layer, self.pooling))


def probe_identity(probes: Sequence[Probe]) -> list[dict[str, Any]]:
    """What defines each probe's numbers: name, layers, pooling, and a digest of the directions used."""
    import hashlib

    out = []
    for p in probes:
        h = hashlib.sha256()
        for layer in p.layers:
            h.update(p.vector.get(layer, p.pooling).float().numpy().tobytes())
        out.append({"name": p.name, "layers": list(p.layers), "pooling": p.pooling, "trait": p.vector.trait,
                    "model_id": p.vector.model_id, "digest": h.hexdigest()[:16]})
    return out


def conversation_pair(row: dict[str, Any], tokenizer: Any) -> tuple[str, str | None]:
    """(formatted prompt, answer or None) of a row with ``messages`` or ``prompt``/``answer``."""
    msgs = chat_messages(row.get("messages"))
    if msgs is not None:
        if msgs[-1]["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            return prompt, str(msgs[-1]["content"])
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), None
    if not missing(row.get("prompt")):
        ans = row.get("answer")
        return str(row["prompt"]), None if missing(ans) else str(ans)
    raise PersonavecError("each row needs 'messages' (a chat) or 'prompt' (+ optional 'answer')")


def columns(probes: Sequence[Probe], poolings: Sequence[str]) -> list[str]:
    out = []
    for p in probes:
        for layer in p.layers:
            for pool in poolings:
                out += [f"{p.name}@L{layer}:{pool}", f"{p.name}@L{layer}:{pool}:cos"]
    return out


@torch.no_grad()
def project_rows(lm: LoadedModel, rows: Sequence[dict[str, Any]], probes: Sequence[Probe],
                 poolings: Sequence[str] = MONITOR_POOLINGS, batch_size: int = 16,
                 max_length: int | None = None) -> pd.DataFrame:
    """Projection and cosine columns for ``rows`` (one model pass for all probes, layers and poolings)."""
    for p in probes:
        p.vector.check_compatible(lm)
    pairs = [conversation_pair(r, lm.tokenizer) for r in rows]
    has_answer = [a is not None and a != "" for _, a in pairs]
    encs = encode_for(lm, [p for p, _ in pairs], [a or "" for _, a in pairs], max_length)
    layers = sorted({layer for p in probes for layer in p.layers})
    col = {layer: i for i, layer in enumerate(layers)}
    out = {c: [math.nan] * len(rows) for c in columns(probes, poolings)}
    for idx, pooled in iter_pooled(lm, encs, layers, list(poolings), batch_size=batch_size):
        for pool in poolings:
            h = pooled[pool].cpu()  # [B, n_layers, d]
            for p in probes:
                for layer in p.layers:
                    u = p.unit(layer)
                    x = h[:, col[layer]]
                    proj = x @ u
                    cos = proj / x.norm(dim=-1).clamp(min=1e-12)
                    for j, i in enumerate(idx):
                        if pool == "response_avg" and not has_answer[i]:
                            continue
                        out[f"{p.name}@L{layer}:{pool}"][i] = float(proj[j])
                        out[f"{p.name}@L{layer}:{pool}:cos"][i] = float(cos[j])
    return pd.DataFrame(out)


def iter_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Fixed-size chunks of a JSONL / JSON-lines, Parquet or CSV file, streamed."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
            yield batch.to_pandas()
    elif suffix == ".csv":
        yield from pd.read_csv(path, chunksize=chunk_rows, keep_default_na=False, na_values=[""])
    elif suffix in (".jsonl", ".json"):
        buf: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    buf.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PersonavecError(f"{path}:{n}: malformed JSON ({e.msg})") from None
                if len(buf) == chunk_rows:
                    yield pd.DataFrame(buf)
                    buf = []
        if buf:
            yield pd.DataFrame(buf)
    else:
        read_table(path)  # raises the unsupported-type error


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
                append_text(f, merged.to_json(orient="records", lines=True, force_ascii=False, default_handler=str))
                bar.update(len(chunk))
        bar.close()
    return out


# ---------------------------------------------------------------------------------------------------------
# Live monitor
# ---------------------------------------------------------------------------------------------------------

@dataclass
class LiveMonitor:
    """Per-token projection of the newest position at ``layer`` during generation.

    ``on_token(step, projections)`` gets, for every forward pass (step 0 = the prompt's last token, then one
    per generated token), the projection of each row's newest position on v̂. When a row's projection exceeds
    ``threshold``: ``action="stop"`` ends generation (use :meth:`stopping_criteria`), ``action="steer"`` adds
    ``steer_coef · v`` (negative: suppressive) at the layer from the next token on.
    """

    vector: torch.Tensor
    layer: int
    threshold: float = math.inf
    action: str = "stop"  # stop | steer | none
    steer_coef: float = -1.0
    on_token: Callable[[int, torch.Tensor], None] | None = None
    history: list[torch.Tensor] = field(default_factory=list)
    triggered: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.action not in ("stop", "steer", "none"):
            raise PersonavecError(f"monitor action must be stop, steer or none, not {self.action!r}")
        self.unit = self.vector.float() / self.vector.float().norm().clamp(min=1e-12)

    def _observe(self, _layer: int, hidden: torch.Tensor) -> None:
        p = (hidden[:, -1].float() @ self.unit.to(hidden.device)).cpu()
        step = len(self.history)
        self.history.append(p)
        hit = p > self.threshold
        self.triggered = hit if self.triggered is None else (self.triggered | hit)
        if self.on_token is not None:
            self.on_token(step, p)

    def stopping_criteria(self) -> Any:
        from transformers import StoppingCriteria, StoppingCriteriaList

        monitor = self

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.Tensor:
                if monitor.action != "stop" or monitor.triggered is None:
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                return monitor.triggered.to(input_ids.device)

        return StoppingCriteriaList([_Stop()])

    @contextlib.contextmanager
    def attach(self, model: Any) -> Iterator[LiveMonitor]:
        m = getattr(model, "model", model)
        n = len(decoder_layers(m))
        if not 1 <= self.layer <= n:
            raise PersonavecError(f"monitor layer {self.layer} out of range 1..{n}")
        self.history, self.triggered = [], None
        delta = self.steer_coef * self.vector.float()

        def maybe_steer(h: torch.Tensor) -> torch.Tensor:
            if self.action != "steer" or self.triggered is None or not bool(self.triggered.any()):
                return h
            rows = self.triggered.to(h.device)[:, None, None].to(h.dtype)
            return h + rows * delta.to(device=h.device, dtype=h.dtype)

        with contextlib.ExitStack() as stack:
            # the edit is a prepended hook, so it runs before the observer in each pass: the decision to steer
            # comes from earlier passes' projections, and the observer reads the (possibly) edited stream
            stack.enter_context(capture(m, [self.layer], self._observe, stop_early=False))
            stack.enter_context(edit(m, self.layer, maybe_steer))
            yield self
