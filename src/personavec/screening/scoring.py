"""Training-data screening with persona vectors: which samples will teach a model the trait?

Scores per (prompt, response) sample, for each vector at each requested layer (scalar projections on v̂):

* ``delta_p``       — the paper's projection difference ΔP: the response-average projection of the dataset's
                      response minus that of the *base model's own* response to the same prompt. It measures
                      how much more trait the training answer carries than what the model would say anyway,
                      which is what fine-tuning on it pushes the model towards. Needs one generation per
                      distinct prompt (cached on disk, so done once).
* ``response``      — the dataset response's projection alone (no generation; cheap). Good for ranking samples
                      that answer *similar* prompts; mixes in prompt effects across very different prompts.
* ``base_response`` — the base answer's projection (part of ΔP).
* ``prompt_last``   — the last prompt token's projection (no answer needed at all; cheapest): flags prompts
                      that pull the model towards the trait, not answers that teach it.

Modes: ``delta`` (all four), ``response`` (response + prompt_last), ``prompt_last``.

Scale: the input (JSONL or Parquet, any length) is streamed in fixed chunks of ``chunk_rows`` rows; chunk
``k`` is scored and written atomically as ``parts/chunk-k.parquet``, so memory is bounded by one chunk, a
killed run resumes at the first missing chunk, and nothing is duplicated. Inside a chunk, pairs are batched
by length and every forward pass stops after the highest layer needed. The same chunk function runs on
Ray Data workers (:mod:`.ray`): chunks are formed from global row numbers exactly as locally,
so both paths produce the same table. The report (means, histograms, top and bottom rows, filtered data) is in
:mod:`.report`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..cache import KeyValueCache, digest
from ..engine.sampling import SamplingConfig, generate
from ..errors import PersonavecError, finite, shown, whole
from ..files import atomic_path, claim_settings, fingerprint, iter_chunks, locked
from ..model.chat import conversation_pair
from ..model.loading import LoadedModel, check_loaded
from ..model.projection import column, project_pairs
from ..sae.autoencoder import SparseAutoencoder
from ..vectors.probe import Probe, directions, make_probes, probe_identity
from ..vectors.vector import PersonaVector
from .features import check_sae, feature_columns
from .features import identity as sae_identity

MODES = ("delta", "response", "prompt_last")
KINDS = {"delta": ("delta_p", "response", "base_response", "prompt_last"),
         "response": ("response", "prompt_last"), "prompt_last": ("prompt_last",)}
PARTS = "parts"


@dataclass(frozen=True)
class ScreenConfig:
    mode: str = "delta"
    chunk_rows: int = 512
    batch_size: int = 16
    gen_batch_size: int = 16
    max_new_tokens: int = 256
    temperature: float = 0.0  # base answers: greedy by default (deterministic, one per distinct prompt)
    seed: int = 0
    max_length: int | None = None  # tokens per (prompt, answer) pair; None: the model's context length
    stop_early: bool = True
    bucket: bool = True

    def __post_init__(self) -> None:
        """Types and ranges of every field, named (``ScreenConfig(chunk_rows="5")`` was a TypeError mid-screen)."""
        if self.mode not in MODES:
            raise PersonavecError(f"screening mode must be one of {', '.join(MODES)}, not {shown(self.mode)}")
        for name in ("chunk_rows", "batch_size", "gen_batch_size", "max_new_tokens"):
            object.__setattr__(self, name, whole(getattr(self, name), f"ScreenConfig {name}", low=1))
        object.__setattr__(self, "seed", whole(self.seed, "ScreenConfig seed", low=0, high=2**63 - 1))
        if self.max_length is not None:
            object.__setattr__(self, "max_length", whole(self.max_length, "ScreenConfig max_length", low=1))
        temperature = finite(self.temperature, "ScreenConfig temperature")
        if temperature < 0:
            raise PersonavecError(f"ScreenConfig temperature must be at least 0 (0: greedy), not {temperature:g}")
        object.__setattr__(self, "temperature", temperature)
        for name in ("stop_early", "bucket"):
            if not isinstance(getattr(self, name), bool):
                raise PersonavecError(f"ScreenConfig {name} must be True or False, not {shown(getattr(self, name))}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """Settings that change the scores (not speed knobs such as batch sizes or early stopping)."""
        d = self.to_dict()
        for k in ("batch_size", "gen_batch_size", "stop_early", "bucket"):
            d.pop(k)
        return d


DEFAULT_CONFIG = ScreenConfig()


# ---------------------------------------------------------------------------------------------------------
# base answers, generated once


def base_answer_cache(path: str | os.PathLike) -> KeyValueCache:
    """Base-model answers by (model, generation settings, prompt) in SQLite; shareable between processes."""
    return KeyValueCache(path, "base_answers_v2", what="base-answer cache (--base-cache)")


def base_key(lm: LoadedModel, cfg: ScreenConfig, prompt: str) -> str:
    return digest(lm.model_id, lm.revision, str(lm.dtype), cfg.max_new_tokens, cfg.temperature, cfg.seed, prompt)


def base_answers(lm: LoadedModel, prompts: Sequence[str], cfg: ScreenConfig,
                 cache: KeyValueCache | None = None) -> tuple[list[str], int]:
    """The base model's answer to each prompt (one per distinct prompt, seeded by the prompt itself, so it is the
    same whichever chunk or worker asks); returns answers and tokens generated."""
    keys = [base_key(lm, cfg, p) for p in prompts]
    known = cache.get_many(keys) if cache is not None else {}
    todo = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in known))
    generated = 0
    if todo:
        sampling = SamplingConfig(n_samples=1, temperature=cfg.temperature, top_p=1.0,
                                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, seed=cfg.seed)
        seeds = [int(digest(cfg.seed, p)[:12], 16) for p in todo]
        new: dict[str, str] = {}
        for p, r in zip(todo, generate(lm, todo, sampling, seeds=seeds)):
            new[base_key(lm, cfg, p)] = r["answer"]
            generated += int(r["n_tokens"])
        if cache is not None:
            cache.put_many(new)
        known = {**known, **new}
    return [known[k] for k in keys], generated


# ---------------------------------------------------------------------------------------------------------
# one chunk


def _project(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], probes: Sequence[Probe],
             poolings: Sequence[str], cfg: ScreenConfig) -> pd.DataFrame:
    return project_pairs(lm, prompts, answers, directions(probes), poolings, batch_size=cfg.batch_size,
                         max_length=cfg.max_length, stop_early=cfg.stop_early, sort_by_length=cfg.bucket)


def row_pair(row: dict[str, Any], number: int, tokenizer: Any, cfg: ScreenConfig) -> tuple[str, str]:
    """The (prompt, response) of input row ``number``, or one line saying what the row lacks."""
    try:
        prompt, answer = conversation_pair(row, tokenizer)
    except PersonavecError as e:
        raise PersonavecError(f"row {number}: {e}") from None
    if answer is None and cfg.mode != "prompt_last":
        raise PersonavecError(f"row {number} has no response to screen; give 'messages' ending with an "
                              "assistant turn or 'prompt' + 'answer', or use --mode prompt_last")
    return prompt, answer or ""


def check_rows(path: Path, tokenizer: Any, cfg: ScreenConfig) -> None:
    """Every input row read as the screening will read it, before its directory is claimed: a bad row, or a file
    without rows, is refused without leaving settings that would refuse the corrected data."""
    n = 0
    for k, chunk in enumerate(iter_chunks(path, cfg.chunk_rows)):
        for j, r in enumerate(chunk.to_dict("records")):
            row_pair(r, k * cfg.chunk_rows + j, tokenizer, cfg)
        n += len(chunk)
    if n == 0:
        raise PersonavecError(f"{path} holds no rows")


@torch.no_grad()
def screen_chunk(lm: LoadedModel, rows: Sequence[dict[str, Any]], first_row: int,
                 probes: Sequence[Probe], cfg: ScreenConfig, cache: KeyValueCache | None = None,
                 sae: SparseAutoencoder | None = None) -> pd.DataFrame:
    """Scores of one chunk of input rows (``row`` = global row number) plus token counts and timing; with an
    ``sae``, the features that carry each row's score (:mod:`.features`)."""
    t0 = time.perf_counter()
    pairs = [row_pair(r, first_row + k, lm.tokenizer, cfg) for k, r in enumerate(rows)]
    prompts = [p for p, _ in pairs]
    answers = [a for _, a in pairs]
    poolings = ["prompt_last"] if cfg.mode == "prompt_last" else ["response_avg", "prompt_last"]
    proj = _project(lm, prompts, answers, probes, poolings, cfg)
    lengths = proj.attrs["n_tokens"]
    n_tokens = sum(lengths)
    n = len(rows)
    df = pd.DataFrame({"row": range(first_row, first_row + n)})
    for p in probes:
        for layer in p.layers:
            if cfg.mode != "prompt_last":
                df[f"{p.name}@L{layer}:response"] = column(proj, n, p.name, layer, "response_avg")
            df[f"{p.name}@L{layer}:prompt_last"] = column(proj, n, p.name, layer, "prompt_last")
    generated = 0
    base = None
    if cfg.mode == "delta":
        base, generated = base_answers(lm, prompts, cfg, cache)
        bproj = _project(lm, prompts, base, probes, ["response_avg"], cfg)
        n_tokens += sum(bproj.attrs["n_tokens"])
        df["base_answer"] = base
        for p in probes:
            for layer in p.layers:
                b = pd.Series(column(bproj, n, p.name, layer), dtype="float64")
                df[f"{p.name}@L{layer}:base_response"] = b.to_numpy()
                df[f"{p.name}@L{layer}:delta_p"] = (df[f"{p.name}@L{layer}:response"] - b).to_numpy()
    if sae is not None:
        feats = feature_columns(lm, sae, probes, prompts, answers, base, cfg.batch_size, cfg.max_length)
        df = pd.concat([df, feats], axis=1)
    df["n_tokens"] = lengths
    df.attrs["stats"] = {"seconds": time.perf_counter() - t0, "tokens": n_tokens, "generated_tokens": generated}
    return df


# ---------------------------------------------------------------------------------------------------------
# files: parts, resumption, assembly


def part_path(out_dir: Path, chunk_id: int) -> Path:
    return out_dir / PARTS / f"chunk-{chunk_id:08d}.parquet"


def write_part(df: pd.DataFrame, path: Path) -> None:
    """Write one chunk's scores atomically; its timing and token counts ride in the Parquet metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"personavec_stats"] = json.dumps(df.attrs.get("stats", {})).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def check_settings(out_dir: Path, path: Path, probes: Sequence[Probe], cfg: ScreenConfig, model_id: str,
                   sae: SparseAutoencoder | None = None) -> None:
    """Write ``screen_config.json`` once; refuse to continue a directory made with other settings or data."""
    settings = {"input": fingerprint(path), "model": model_id, "probes": probe_identity(probes),
                "config": cfg.identity()}
    if sae is not None:  # a directory screened without an SAE keeps its settings as they were
        settings["sae"] = sae_identity(sae)
    claim_settings(out_dir / "screen_config.json", settings,
                   "a screening (of other data?)", "use another --out or delete that directory")


def done_chunks(out_dir: Path) -> set[int]:
    d = out_dir / PARTS
    return {int(f.stem.split("-")[1]) for f in d.glob("chunk-*.parquet")} if d.exists() else set()


def assemble(out_dir: Path, n_chunks: int) -> Path:
    """Concatenate the parts, in row order, into ``screen.parquet`` (streamed: one part in memory at a time)."""
    import pyarrow.parquet as pq

    missing = [k for k in range(n_chunks) if not part_path(out_dir, k).exists()]
    if missing:
        raise PersonavecError(f"{len(missing)} chunks are not scored yet (first: {missing[0]}); run the command again")
    target = out_dir / "screen.parquet"
    with atomic_path(target) as tmp:
        writer = None
        try:
            for k in range(n_chunks):
                t = pq.read_table(part_path(out_dir, k))
                t = t.replace_schema_metadata(None)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, t.schema)
                writer.write_table(t.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
    return target


# ---------------------------------------------------------------------------------------------------------
# the local driver (the Ray Data driver is in .ray)


def screen_file(lm: LoadedModel, path: str | os.PathLike, probes: Sequence[Probe], out_dir: str | os.PathLike,
                cfg: ScreenConfig = DEFAULT_CONFIG, cache_path: str | os.PathLike | None = None,
                progress: bool = True, sae: SparseAutoencoder | None = None) -> dict[str, Any]:
    """Score every row of ``path`` into ``out_dir`` (resumable); returns throughput figures of this call. With an
    ``sae``, each row also gets the features that carry its score."""

    path, out = Path(path), Path(out_dir)
    if not path.is_file():
        raise PersonavecError(f"{path} does not exist")
    for p in probes:
        p.vector.check_compatible(lm)
    if sae is not None:
        check_sae(sae, probes, cfg.mode, lm.n_layers, lm.hidden_size)
    with locked(out, "the screening (--out)"):
        return _screen_file(lm, path, probes, out, cfg, cache_path, progress, sae)


def screen(lm: LoadedModel, data: str | os.PathLike, vectors: Mapping[str, PersonaVector], out_dir: str | os.PathLike,
           config: ScreenConfig = DEFAULT_CONFIG, layers: Sequence[int] | None = None,
           progress: bool = True, sae: SparseAutoencoder | None = None) -> pd.DataFrame:
    """Score every (prompt, response) row of ``data`` on each vector (ΔP by default; see :class:`ScreenConfig`)
    into ``out_dir`` (resumable) and return the table (``out_dir/screen.parquet``): one row per input row.
    Vectors are read at ``layers`` (default: each one's chosen layer). With an ``sae`` (at one of those layers),
    each row also gets the features that carry its score (:mod:`personavec.screening.features`)."""
    check_loaded(lm, "screen")
    for name, value in (("data", data), ("out_dir", out_dir)):
        if not isinstance(value, (str, os.PathLike)):
            raise PersonavecError(f"screen's {name} must be a path, not {shown(value)}")
    if not isinstance(config, ScreenConfig):
        raise PersonavecError(f"screen's config must be a ScreenConfig, e.g. ScreenConfig(mode=\"response\"), not "
                              f"{shown(config)}")
    if layers is not None and (isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__")):
        raise PersonavecError(f"screen's layers must be a list of layer numbers, not {shown(layers)}")
    layers = None if layers is None else [whole(x, "each of screen's layers", low=0) for x in layers]
    if sae is not None and not isinstance(sae, SparseAutoencoder):
        raise PersonavecError(f"screen's sae must be a SparseAutoencoder (pv.load_sae(path)), not {shown(sae)}")
    screen_file(lm, data, make_probes(vectors, layers), out_dir, config, progress=progress, sae=sae)
    return pd.read_parquet(Path(out_dir) / "screen.parquet")


def _screen_file(lm: LoadedModel, path: Path, probes: Sequence[Probe], out: Path, cfg: ScreenConfig,
                 cache_path: str | os.PathLike | None, progress: bool,
                 sae: SparseAutoencoder | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if not (out / "screen_config.json").exists():
        check_rows(path, lm.tokenizer, cfg)
    check_settings(out, path, probes, cfg, lm.model_id, sae)
    done = done_chunks(out)
    cache = base_answer_cache(cache_path or out / "base_answers.sqlite") if cfg.mode == "delta" else None
    t0 = time.perf_counter()
    stats = {"rows": 0, "tokens": 0, "generated_tokens": 0}
    n_chunks = 0
    bar = tqdm(desc="screening", unit="row", disable=not progress)
    try:
        for k, chunk in enumerate(iter_chunks(path, cfg.chunk_rows)):
            n_chunks = k + 1
            if k in done:
                bar.update(len(chunk))
                continue
            df = screen_chunk(lm, chunk.to_dict("records"), k * cfg.chunk_rows, probes, cfg, cache, sae)
            write_part(df, part_path(out, k))
            s = df.attrs["stats"]
            stats["rows"] += len(df)
            stats["tokens"] += s["tokens"]
            stats["generated_tokens"] += s["generated_tokens"]
            bar.update(len(chunk))
    finally:
        bar.close()
        if cache is not None:
            cache.close()
    if n_chunks == 0:
        raise PersonavecError(f"{path} holds no rows")
    assemble(out, n_chunks)
    return throughput(stats, time.perf_counter() - t0)


def throughput(stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {**stats, "seconds": round(seconds, 2),
            "samples_per_s": round(stats["rows"] / seconds, 2) if seconds > 0 and stats["rows"] else None,
            "tokens_per_s": round(stats["tokens"] / seconds, 1) if seconds > 0 and stats["rows"] else None}
