"""Seeded chat sampling on the engine, written incrementally and resumable.

:func:`run_sampling` answers a fixed list of jobs into a JSONL log: job ``j`` samples with its own seed
(``seed · 1 000 003 + j``), so its answer does not depend on which other jobs share its batch, on the batch size,
or on whether the run was interrupted. Each answer is appended (flushed and fsynced) the moment it finishes; on
resume, the jobs already in the log are kept (the first answer of each, a torn last line dropped) and only the
others are sampled. :func:`generate` and :func:`chat` are the same engine for answers that need no log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import PersonavecError, finite, shown, whole
from ..files import append_jsonl, read_jsonl, repair_jsonl, rewrite_jsonl
from ..model.edits import Edit
from ..model.loading import LoadedModel, check_loaded
from .decoder import Engine, Request


@dataclass(frozen=True)
class SamplingConfig:
    """Paper defaults: 10 samples per (question, instruction), temperature 1, top_p 1, up to 1000 new tokens.

    ``batch_size``: rows decoded together (None: from free memory on CUDA, 64 on CPU). ``engine`` names how jobs are
    seeded and batched, so that a run directory sampled another way is not resumed with this one.
    """

    n_samples: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1000
    batch_size: int | None = None
    seed: int = 0
    engine: str = "continuous-batching, seeded per job, u in (0, 1]"

    def __post_init__(self) -> None:
        """Types and ranges of every field, named, at construction (NumPy numbers become Python ones)."""
        ints = {"n_samples": whole(self.n_samples, "n_samples", low=1),
                "max_new_tokens": whole(self.max_new_tokens, "max_new_tokens", low=1),
                "seed": whole(self.seed, "seed", low=0, high=2**63 - 1),
                "batch_size": None if self.batch_size is None else whole(self.batch_size, "batch_size", low=1)}
        temperature, top_p = finite(self.temperature, "temperature"), finite(self.top_p, "top_p")
        if temperature < 0:
            raise PersonavecError(f"temperature must be at least 0 (0: greedy), not {temperature:g}")
        if not 0 < top_p <= 1:
            raise PersonavecError(f"top_p must be above 0 and at most 1, not {top_p:g}")
        if not isinstance(self.engine, str):
            raise PersonavecError(f"engine must be a string (it names how jobs are sampled), not {shown(self.engine)}")
        for name, value in {**ints, "temperature": temperature, "top_p": top_p}.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def request(self, prompt: str, seed: int, edits: Sequence[Edit] = (), key: Any = None,
                messages: Sequence[dict[str, str]] | None = None) -> Request:
        return Request(prompt, self.max_new_tokens, self.temperature, self.top_p, seed, tuple(edits), key,
                       messages=tuple(messages) if messages else None)


QUICK = SamplingConfig(n_samples=2, max_new_tokens=64, batch_size=96)  # bench/generate.py: 96 rows beat 32 on CPU


def job_seed(seed: int, job: int) -> int:
    return seed * 1_000_003 + job


def generate(lm: LoadedModel, prompts: Sequence[str], cfg: SamplingConfig, seeds: Sequence[int] | None = None,
             edits: Sequence[Sequence[Edit]] | None = None, progress: bool | str = False) -> list[dict[str, Any]]:
    """One answer per chat-formatted prompt (its own seed and edits), in order: ``answer``, ``n_tokens``,
    ``truncated``."""
    seeds = seeds if seeds is not None else [job_seed(cfg.seed, i) for i in range(len(prompts))]
    requests = [cfg.request(p, s, edits[i] if edits else (), key=i) for i, (p, s) in enumerate(zip(prompts, seeds))]
    out: list[dict[str, Any]] = [{}] * len(prompts)
    for r in Engine(lm, cfg.batch_size).generate(requests, progress=progress):
        out[r.key] = {"answer": r.text, "n_tokens": r.n_tokens, "truncated": r.finish == "length"}
    return out


def chat(lm: LoadedModel, user: str, system: str | None = None, max_new_tokens: int = 80, temperature: float = 0.0,
         seed: int = 0) -> str:
    """One answer to ``user`` (with an optional system prompt); greedy unless ``temperature`` > 0. Steering edits
    active around the call apply. A prompt that leaves no room in the model's context for ``max_new_tokens`` is
    refused (as the server does), not cut."""
    check_loaded(lm, "chat")
    for name, value, one in (("user", user, "question"), ("system", system, "system prompt")):
        if not isinstance(value, str) and (name == "user" or value is not None):
            hint = "; for several chats, call chat once per question" if isinstance(value, (list, tuple)) else ""
            raise PersonavecError(f"chat's {name} must be a string (one {one}), not {shown(value)}{hint}")
    cfg = SamplingConfig(n_samples=1, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    prompt = lm.format_chat(user, system=system)
    check_context(lm, [prompt], cfg.max_new_tokens)
    return generate(lm, [prompt], cfg, seeds=[cfg.seed])[0]["answer"]


def check_context(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, length: str = "max_new_tokens",
                  what: str = "question") -> None:
    """Refuse a prompt that, with ``max_new_tokens`` of answer, does not fit the model's context (the server's rule;
    ``length`` names the setting in the message: a CLI flag or the argument)."""
    context = lm.context_length
    if not context:
        return
    for ids in lm.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]:
        if len(ids) + max_new_tokens > context:
            raise PersonavecError(f"the prompt has {len(ids)} tokens and {length} is {max_new_tokens}: together more "
                                  f"than the model's context of {context} tokens; shorten the {what}"
                                  + (f" or lower {length}" if len(ids) < context else ""))


def job_messages(job: dict[str, Any]) -> list[dict[str, str]]:
    """The chat of a job as messages: its ``system`` prompt (if any) and its ``question``."""
    system = job.get("system")
    return ([{"role": "system", "content": str(system)}] if system else []) + [
        {"role": "user", "content": str(job["question"])}]


def run_sampling(lm: LoadedModel, jobs: Sequence[dict[str, Any]], cfg: SamplingConfig, path: Path,
                 progress: bool | str = True, edits: Callable[[dict[str, Any]], Sequence[Edit]] | None = None,
                 sampler: Any = None) -> list[dict[str, Any]]:
    """Sample an answer for every job (a dict with at least ``prompt``; ``edits(job)`` gives its steering, an
    optional ``seed`` its seed, an optional ``temperature`` its own), appending rows to ``path``. Each row is the
    job plus ``answer``, ``n_tokens``, ``truncated`` and ``job`` (its index). Jobs already answered in ``path``
    are kept; the rest are sampled, by the local engine or by ``sampler`` (an
    :class:`~personavec.engine.remote.EndpointSampler`, which takes each job's ``system`` and ``question`` as chat
    messages). Returns all rows in job order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl(path)  # a torn last line from a killed writer
    rows = read_jsonl(path)
    seeds = [int(job.get("seed", job_seed(cfg.seed, j))) for j, job in enumerate(jobs)]
    kept: dict[int, dict[str, Any]] = {}
    for r in rows:  # the first answer of each job counts; an answer to another prompt or seed does not
        j = int(r.get("job", -1))
        if 0 <= j < len(jobs) and j not in kept and r.get("prompt") == jobs[j]["prompt"] and \
                int(r.get("seed", seeds[j])) == seeds[j]:
            kept[j] = r
    if len(kept) != len(rows):
        rewrite_jsonl(path, sorted(kept.values(), key=lambda r: int(r["job"])))
    todo = [j for j in range(len(jobs)) if j not in kept]
    requests = [cfg.request(jobs[j]["prompt"], seeds[j], edits(jobs[j]) if edits else (), key=j,
                            messages=job_messages(jobs[j]) if sampler is not None else None) for j in todo]
    # a job may set its own temperature (the steering grid's greedy answers beside its sampled ones)
    requests = [replace(r, temperature=float(jobs[r.key]["temperature"])) if "temperature" in jobs[r.key] else r
                for r in requests]
    if todo:
        with open(path, "a", encoding="utf-8") as f:
            engine = sampler if sampler is not None else Engine(lm, cfg.batch_size)
            for r in engine.generate(requests, progress=progress, total=len(jobs), initial=len(kept)):
                append_jsonl(f, [{**jobs[r.key], "seed": seeds[r.key], "answer": r.text, "n_tokens": r.n_tokens,
                                  "truncated": r.finish == "length", "job": r.key}])
    final = read_jsonl(path)
    final.sort(key=lambda r: int(r["job"]))
    if [int(r["job"]) for r in final] != list(range(len(jobs))):
        raise PersonavecError(f"{path} does not hold one answer per job (another process wrote to it?); run the "
                              "same command again to repair it")
    return final
