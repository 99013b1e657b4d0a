"""Batched, seeded chat sampling on the target model, written incrementally and resumable.

Jobs are fixed in advance and cut into fixed batches; batch ``b`` samples with seed ``seed · 1_000_003 + b``,
so a resumed run reproduces exactly what an uninterrupted one would have written. Rows are appended to a
JSONL file one batch at a time (flushed and fsynced); on resume, a batch that was only partly written is
dropped and sampled again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import PersonavecError
from ..files import append_jsonl, read_jsonl, rewrite_jsonl
from ..model.layers import _unwrap
from ..model.loading import LoadedModel, pad_token_id


@dataclass(frozen=True)
class SamplingConfig:
    """Paper defaults: 10 samples per (question, instruction), temperature 1, top_p 1, up to 1000 new tokens."""

    n_samples: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1000
    batch_size: int = 16
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = SamplingConfig(n_samples=2, max_new_tokens=64, batch_size=25)


def stop_token_ids(lm: LoadedModel) -> list[int]:
    """Tokens that end an answer: the tokenizer's end of sequence and the model's declared end-of-turn tokens."""
    declared = getattr(getattr(_unwrap(lm.model), "generation_config", None), "eos_token_id", None)
    ids = [lm.tokenizer.eos_token_id, *(declared if isinstance(declared, list) else [declared])]
    return sorted({int(t) for t in ids if t is not None})


def generation_config(lm: LoadedModel, cfg: SamplingConfig) -> Any:
    """A complete GenerationConfig for ``cfg``: plain sampling at ``temperature`` and ``top_p`` (no top-k, no
    penalties, no minimum length), or greedy at temperature 0."""
    from transformers import GenerationConfig

    sample = cfg.temperature > 0
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=0, do_sample=sample, num_beams=1,
        temperature=cfg.temperature if sample else 1.0, top_p=cfg.top_p if sample else 1.0, top_k=0, min_p=None,
        typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, length_penalty=1.0,
        pad_token_id=pad_token_id(lm.tokenizer), eos_token_id=stop_token_ids(lm), bos_token_id=None)


@contextmanager
def _without_model_defaults(model: Any) -> Iterator[None]:
    """Hide the model's own ``generation_config`` while ``generate`` runs: Hugging Face fills every setting left
    unset from it (e.g. Qwen2.5-Instruct's repetition_penalty 1.05), so a run would not sample as recorded."""
    from transformers import GenerationConfig

    base = _unwrap(model)
    own = getattr(base, "generation_config", None)
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = own


@torch.no_grad()
def sample_batch(lm: LoadedModel, prompts: Sequence[str], cfg: SamplingConfig, seed: int) -> list[dict[str, Any]]:
    """Sample one answer per chat-formatted prompt (left-padded batch). Returns answer + token counts."""
    tok = lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    finally:
        tok.padding_side = side
    torch.manual_seed(seed)
    with _without_model_defaults(lm.model):
        out = lm.model.generate(**enc, generation_config=generation_config(lm, cfg))
    new = out[:, enc["input_ids"].shape[1]:]
    eos = {*stop_token_ids(lm), pad_token_id(tok)}
    rows = []
    for seq in new.tolist():
        n = len(seq)
        for j, t in enumerate(seq):
            if t in eos:
                n = j
                break
        rows.append({"answer": tok.decode(seq[:n], skip_special_tokens=True).strip(), "n_tokens": n,
                     "truncated": n >= cfg.max_new_tokens})
    return rows


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def run_sampling(lm: LoadedModel, jobs: Sequence[dict[str, Any]], cfg: SamplingConfig, path: Path,
                 progress: bool | str = True) -> list[dict[str, Any]]:
    """Sample an answer for every job (a dict with at least ``prompt``), appending rows to ``path``.

    Each row is the job plus ``answer``, ``n_tokens``, ``truncated``, ``job`` (index) and ``batch``. Already complete
    batches in ``path`` are kept; the rest is sampled. Returns all rows in job order.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    batches = [list(range(i, min(i + cfg.batch_size, len(jobs)))) for i in range(0, len(jobs), cfg.batch_size)]
    rows = read_jsonl(path)
    by_batch: dict[int, dict[int, dict[str, Any]]] = {}
    for r in rows:  # the first answer of each job counts (a log written twice holds every job twice)
        by_batch.setdefault(int(r["batch"]), {}).setdefault(int(r["job"]), r)
    complete = {b for b, rs in by_batch.items() if b < len(batches) and sorted(rs) == batches[b]}
    kept = [r for b in sorted(complete) for r in by_batch[b].values()]
    if len(kept) != len(rows) or (path.exists() and len(rows) != _count_lines(path)):
        rewrite_jsonl(path, kept)  # drop partly written batches, repeated answers and any torn line
    todo = [b for b in range(len(batches)) if b not in complete]
    with tqdm(total=len(jobs), initial=len(jobs) - sum(len(batches[b]) for b in todo),
              desc=progress if isinstance(progress, str) else "sampling", disable=not progress, unit="answer") as bar, \
            open(path, "a", encoding="utf-8") as f:
        for b in todo:
            idx = batches[b]
            answers = sample_batch(lm, [jobs[i]["prompt"] for i in idx], cfg, seed=cfg.seed * 1_000_003 + b)
            append_jsonl(f, [{**jobs[i], **a, "job": i, "batch": b} for i, a in zip(idx, answers)])
            bar.update(len(idx))
    final = read_jsonl(path)
    final.sort(key=lambda r: int(r["job"]))
    if [int(r["job"]) for r in final] != list(range(len(jobs))):
        raise PersonavecError(f"{path} does not hold one answer per job (another process wrote to it?); run the "
                              "same command again to repair it")
    return final


def chat(lm: LoadedModel, user: str, system: str | None = None, max_new_tokens: int = 80, temperature: float = 0.0,
         seed: int = 0) -> str:
    """One answer to ``user`` (with an optional system prompt); greedy unless ``temperature`` > 0. Steering edits
    active around the call apply."""
    cfg = SamplingConfig(n_samples=1, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens)
    return sample_batch(lm, [lm.format_chat(user, system=system)], cfg, seed=seed)[0]["answer"]
