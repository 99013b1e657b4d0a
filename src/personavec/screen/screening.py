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
Ray Data workers (:func:`screen_file_ray`): chunks are formed from global row numbers exactly as locally,
so both paths produce the same table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..engine.sampling import SamplingConfig, sample_batch
from ..errors import PersonavecError
from ..files import atomic_path, atomic_write, claim_settings, fingerprint, iter_chunks, locked, save_figure, write_json
from ..model.activations import length_batches
from ..model.chat import conversation_pair
from ..model.loading import LoadedModel, model_id_for
from ..model.projection import column, project_pairs
from ..vectors.probe import Probe, directions, probe_identity

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
        if self.mode not in MODES:
            raise PersonavecError(f"screening mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.chunk_rows < 1 or self.batch_size < 1 or self.gen_batch_size < 1:
            raise PersonavecError("chunk_rows, batch_size and gen_batch_size must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """Settings that change the scores (not speed knobs such as batch sizes or early stopping)."""
        d = self.to_dict()
        for k in ("batch_size", "gen_batch_size", "stop_early", "bucket"):
            d.pop(k)
        return d


def score_columns(probes: Sequence[Probe], mode: str) -> list[str]:
    return [f"{p.name}@L{layer}:{kind}" for p in probes for layer in p.layers for kind in KINDS[mode]]


# ---------------------------------------------------------------------------------------------------------
# base answers, generated once


class BaseAnswerCache:
    """Base-model answers by (model, generation settings, prompt) in SQLite; shareable between processes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=60.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS base_answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")
            self._conn.commit()
        except sqlite3.Error as exc:
            raise PersonavecError(f"cannot open the base-answer cache {self.path} ({exc}); delete it or pass "
                                  "another --base-cache") from None

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), 500):
            part = uniq[i:i + 500]
            q = f"SELECT key, answer FROM base_answers WHERE key IN ({','.join('?' * len(part))})"
            found.update(dict(self._conn.execute(q, part).fetchall()))
        return found

    def put_many(self, items: dict[str, str]) -> None:
        self._conn.executemany("INSERT OR REPLACE INTO base_answers VALUES (?, ?)", list(items.items()))
        self._conn.commit()

    def close(self) -> None:
        self._conn.close()


def base_key(lm: LoadedModel, cfg: ScreenConfig, prompt: str) -> str:
    ident = [lm.model_id, lm.revision, str(lm.dtype), cfg.max_new_tokens, cfg.temperature, cfg.seed, prompt]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def base_answers(lm: LoadedModel, prompts: Sequence[str], cfg: ScreenConfig, chunk_id: int,
                 cache: BaseAnswerCache | None = None) -> tuple[list[str], int]:
    """The base model's answer to each prompt (one per distinct prompt); returns answers and tokens generated."""
    keys = [base_key(lm, cfg, p) for p in prompts]
    known = cache.get_many(keys) if cache is not None else {}
    todo = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in known))
    generated = 0
    if todo:
        lengths = [len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in todo]
        sampling = SamplingConfig(n_samples=1, temperature=cfg.temperature, top_p=1.0,
                                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, seed=cfg.seed)
        new: dict[str, str] = {}
        for b, idx in enumerate(length_batches(lengths, cfg.gen_batch_size, sort=cfg.bucket)):
            rows = sample_batch(lm, [todo[j] for j in idx], sampling,
                                seed=cfg.seed * 1_000_003 + chunk_id * 1_009 + b)
            for j, r in zip(idx, rows):
                new[base_key(lm, cfg, todo[j])] = r["answer"]
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


@torch.no_grad()
def screen_chunk(lm: LoadedModel, rows: Sequence[dict[str, Any]], first_row: int, chunk_id: int,
                 probes: Sequence[Probe], cfg: ScreenConfig, cache: BaseAnswerCache | None = None) -> pd.DataFrame:
    """Scores of one chunk of input rows (``row`` = global row number) plus token counts and timing."""
    t0 = time.perf_counter()
    pairs = []
    for k, r in enumerate(rows):
        try:
            prompt, answer = conversation_pair(r, lm.tokenizer)
        except PersonavecError as e:
            raise PersonavecError(f"row {first_row + k}: {e}") from None
        if answer is None and cfg.mode != "prompt_last":
            raise PersonavecError(f"row {first_row + k} has no response to screen; give 'messages' ending with an "
                                  "assistant turn or 'prompt' + 'answer', or use --mode prompt_last")
        pairs.append((prompt, answer or ""))
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
    if cfg.mode == "delta":
        base, generated = base_answers(lm, prompts, cfg, chunk_id, cache)
        bproj = _project(lm, prompts, base, probes, ["response_avg"], cfg)
        n_tokens += sum(bproj.attrs["n_tokens"])
        df["base_answer"] = base
        for p in probes:
            for layer in p.layers:
                b = pd.Series(column(bproj, n, p.name, layer), dtype="float64")
                df[f"{p.name}@L{layer}:base_response"] = b.to_numpy()
                df[f"{p.name}@L{layer}:delta_p"] = (df[f"{p.name}@L{layer}:response"] - b).to_numpy()
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


def part_stats(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"personavec_stats", b"{}"))


def check_settings(out_dir: Path, path: Path, probes: Sequence[Probe], cfg: ScreenConfig, model_id: str) -> None:
    """Write ``screen_config.json`` once; refuse to continue a directory made with other settings or data."""
    claim_settings(out_dir / "screen_config.json",
                   {"input": fingerprint(path), "model": model_id, "probes": probe_identity(probes),
                    "config": cfg.identity()},
                   f"{out_dir} holds a screening of other data or settings; use another --out or delete that directory")


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
# drivers: local (default) and Ray Data


def screen_file(lm: LoadedModel, path: str | os.PathLike, probes: Sequence[Probe], out_dir: str | os.PathLike,
                cfg: ScreenConfig = ScreenConfig(), cache_path: str | os.PathLike | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Score every row of ``path`` into ``out_dir`` (resumable); returns throughput figures of this call."""

    path, out = Path(path), Path(out_dir)
    if not path.is_file():
        raise PersonavecError(f"{path} does not exist")
    for p in probes:
        p.vector.check_compatible(lm)
    with locked(out, "the screening (--out)"):
        return _screen_file(lm, path, probes, out, cfg, cache_path, progress)


def _screen_file(lm: LoadedModel, path: Path, probes: Sequence[Probe], out: Path, cfg: ScreenConfig,
                 cache_path: str | os.PathLike | None, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    check_settings(out, path, probes, cfg, lm.model_id)
    done = done_chunks(out)
    cache = BaseAnswerCache(cache_path or out / "base_answers.sqlite") if cfg.mode == "delta" else None
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
            df = screen_chunk(lm, chunk.to_dict("records"), k * cfg.chunk_rows, k, probes, cfg, cache)
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
    return _throughput(stats, time.perf_counter() - t0)


def _throughput(stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {**stats, "seconds": round(seconds, 2),
            "samples_per_s": round(stats["rows"] / seconds, 2) if seconds > 0 and stats["rows"] else None,
            "tokens_per_s": round(stats["tokens"] / seconds, 1) if seconds > 0 and stats["rows"] else None}


class _RayScreenWorker:
    """A Ray Data actor: loads the model and vectors once, then scores whole chunks and writes their parts."""

    def __init__(self, model: str, device: str | None, dtype: str | None, vectors: list[dict[str, Any]],
                 cfg: dict[str, Any], out_dir: str) -> None:
        from ..model.loading import load_model
        from ..vectors.formats import load_vector

        self.lm = load_model(model, device=device, dtype=dtype)
        self.probes = [Probe(v["name"], load_vector(v["path"], self.lm.n_layers), tuple(v["layers"]), v.get("pooling"))
                       for v in vectors]
        for p in self.probes:
            p.vector.check_compatible(self.lm)
        self.cfg = ScreenConfig(**cfg)
        self.out = Path(out_dir)
        # a cache of its own on the node's local disk: SQLite's WAL breaks on the network file systems that a
        # cluster's shared output directory often lives on (the answers themselves are kept in the parts)
        self.cache = None
        if self.cfg.mode == "delta":
            import tempfile

            self._cache_dir = tempfile.TemporaryDirectory(prefix="personavec-base-answers-")
            self.cache = BaseAnswerCache(Path(self._cache_dir.name) / "base_answers.sqlite")

    def __call__(self, group: pd.DataFrame) -> pd.DataFrame:
        group = group.sort_values("__pv_row", kind="stable")
        k = int(group["__pv_chunk"].iloc[0])
        first = int(group["__pv_row"].iloc[0])
        rows = group.drop(columns=["__pv_row", "__pv_chunk"]).to_dict("records")
        df = screen_chunk(self.lm, rows, first, k, self.probes, self.cfg, self.cache)
        write_part(df, part_path(self.out, k))
        s = df.attrs["stats"]
        return pd.DataFrame({"chunk": [k], "rows": [len(df)], "tokens": [s["tokens"]],
                             "generated_tokens": [s["generated_tokens"]]})


def screen_file_ray(model: str, path: str | os.PathLike, vectors: Sequence[dict[str, Any]],
                    out_dir: str | os.PathLike, cfg: ScreenConfig = ScreenConfig(), workers: int = 1,
                    device: str | None = None, dtype: str | None = None, address: str | None = None,
                    cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0) -> dict[str, Any]:
    """The same screening on Ray Data: chunks of global rows → ``workers`` model actors → the same parts.

    ``vectors``: ``{"name", "path", "layers", "pooling"}`` per probe (workers load them). ``address``: an
    existing Ray cluster (``auto`` or ``ray://...``); default: a local Ray. The output directory must be on
    storage every worker can write (a shared filesystem on a multi-node cluster); each worker keeps its cache of
    base answers on its own node's local disk.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise PersonavecError("the distributed path needs Ray Data: pip install 'ray[data]'") from None
    from ..model.loading import model_shape
    from ..vectors.formats import load_vector

    path, out = Path(path), Path(out_dir)
    if not path.is_file():
        raise PersonavecError(f"{path} does not exist")
    n_layers = model_shape(model)[0]
    probes = [Probe(v["name"], load_vector(v["path"], n_layers), tuple(v["layers"]), v.get("pooling")) for v in vectors]
    with locked(out, "the screening (--out)"):
        check_settings(out, path, probes, cfg, model_id_for(model))
        return _screen_ray(ray, model, path, vectors, out, cfg, workers, device, dtype, address, cpus_per_worker,
                           gpus_per_worker)


def _screen_ray(ray: Any, model: str, path: Path, vectors: Sequence[dict[str, Any]], out: Path, cfg: ScreenConfig,
                workers: int, device: str | None, dtype: str | None, address: str | None, cpus_per_worker: float,
                gpus_per_worker: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    started = False
    if not ray.is_initialized():
        # two logical CPUs beyond the actors for the read / shuffle tasks, or the actors starve them (deadlock)
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": math.ceil(workers * cpus_per_worker) + 2}))
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            ds = ray.data.read_parquet(str(path))
        elif suffix in (".jsonl", ".json"):
            ds = ray.data.read_json(str(path), lines=True)
        else:
            raise PersonavecError("the Ray path reads .jsonl or .parquet files")
        n = ds.count()
        if n == 0:
            raise PersonavecError(f"{path} holds no rows")
        n_chunks = math.ceil(n / cfg.chunk_rows)
        done = done_chunks(out)
        rows = ray.data.range(n).rename_columns({"id": "__pv_row"})
        chunk_rows = cfg.chunk_rows

        def add_chunk(b: pd.DataFrame) -> pd.DataFrame:
            b = b.assign(__pv_chunk=b["__pv_row"] // chunk_rows)
            return b[~b["__pv_chunk"].isin(done)]

        todo = ds.zip(rows).map_batches(add_chunk, batch_format="pandas")
        summary = todo.groupby("__pv_chunk").map_groups(
            _RayScreenWorker, batch_format="pandas", concurrency=workers, num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None,
            fn_constructor_kwargs={"model": model, "device": device, "dtype": dtype, "vectors": list(vectors),
                                   "cfg": cfg.to_dict(), "out_dir": str(out.resolve())},
        ).to_pandas() if len(done) < n_chunks else pd.DataFrame(columns=["rows", "tokens", "generated_tokens"])
    finally:
        if started:
            ray.shutdown()
    assemble(out, n_chunks)
    stats = {"rows": int(summary["rows"].sum()), "tokens": int(summary["tokens"].sum()),
             "generated_tokens": int(summary["generated_tokens"].sum())}
    return {**_throughput(stats, time.perf_counter() - t0), "workers": workers}


# ---------------------------------------------------------------------------------------------------------
# report: dataset-level ΔP, histograms, top / bottom samples, filtered data


def rank_columns(probes: Sequence[Probe], mode: str) -> dict[str, str]:
    """The column each probe ranks samples by: its main score at its first layer."""
    main = {"delta": "delta_p", "response": "response", "prompt_last": "prompt_last"}[mode]
    return {p.name: f"{p.name}@L{p.layers[0]}:{main}" for p in probes}


def _rows_at(path: Path, wanted: set[int], chunk_rows: int) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    start = 0
    for chunk in iter_chunks(path, chunk_rows):
        for i in range(len(chunk)):
            if start + i in wanted:
                out[start + i] = chunk.iloc[i].to_dict()
        start += len(chunk)
    return out


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(pd.Series(row).to_json(force_ascii=False, default_handler=str))


def report(out_dir: str | os.PathLike, path: str | os.PathLike, probes: Sequence[Probe], cfg: ScreenConfig,
           top_k: int = 20, threshold: float | None = None, percentile: float | None = None,
           throughput: dict[str, Any] | None = None) -> dict[str, Any]:
    """``screen.json`` (dataset-level means, and ``throughput`` when given), ``hist_<vector>.png``, ``top.jsonl`` /
    ``bottom.jsonl`` and, with a ``threshold`` or ``percentile``, ``filtered.jsonl`` (input rows whose rank score
    is not above it)."""
    out, path = Path(out_dir), Path(path)
    table = pd.read_parquet(out / "screen.parquet")
    ranks = rank_columns(probes, cfg.mode)
    score_cols = [c for c in table.columns if "@L" in c]
    summary: dict[str, Any] = {"rows": len(table), "mode": cfg.mode, "rank_columns": ranks,
                               "dataset_mean": {c: _mean(table[c]) for c in score_cols}, "vectors": {}}
    cuts: dict[str, float] = {}
    for name, col in ranks.items():
        vals = table[col].astype("float64")
        cut = threshold if threshold is not None else (
            float(vals.quantile(percentile / 100)) if percentile is not None else None)
        if cut is not None:
            cuts[col] = cut
        summary["vectors"][name] = {
            "column": col, "mean": _mean(vals), "std": _mean(vals.std()), "missing": int(vals.isna().sum()),
            "quantiles": {str(q): _mean(vals.quantile(q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
            "cut": cut, "above_cut": int((vals > cut).sum()) if cut is not None else None}
        _histogram(vals, out / f"hist_{_safe(name)}.png", f"{col} ({cfg.mode})", cut)
    first = next(iter(ranks.values()))
    order = table[["row", first]].dropna().sort_values(first, kind="stable")
    top_rows = order["row"].iloc[::-1][:top_k].tolist()
    bottom_rows = order["row"].iloc[:top_k].tolist()
    originals = _rows_at(path, set(top_rows) | set(bottom_rows), cfg.chunk_rows)
    scores = table.set_index("row")
    for fname, sel in (("top.jsonl", top_rows), ("bottom.jsonl", bottom_rows)):
        with atomic_write(out / fname) as f:
            for r in sel:
                extra = {"row": int(r), **{c: _mean(scores.at[r, c]) for c in score_cols}}
                if "base_answer" in scores.columns:
                    extra["base_answer"] = scores.at[r, "base_answer"]
                f.write(json.dumps({**_jsonable(originals[r]), "screen": extra}, ensure_ascii=False) + "\n")
    if cuts:
        summary["filtered"] = write_filtered(path, table, cuts, out / "filtered.jsonl", cfg.chunk_rows)
    if throughput is not None:
        summary["throughput"] = throughput
    write_json(out / "screen.json", summary)
    return summary


def write_filtered(path: Path, table: pd.DataFrame, cuts: dict[str, float], target: Path,
                   chunk_rows: int) -> dict[str, Any]:
    """Stream the input and keep rows whose every rank score is ≤ its cut (a missing score keeps the row)."""
    drop = pd.Series(False, index=table["row"].to_numpy())
    for col, cut in cuts.items():
        drop |= (table[col].astype("float64") > cut).to_numpy()
    kept = 0
    start = 0
    with atomic_write(target) as f:
        for chunk in iter_chunks(path, chunk_rows):
            mask = ~drop.iloc[start:start + len(chunk)].to_numpy()
            sub = chunk[mask]
            if len(sub):
                f.write(sub.to_json(orient="records", lines=True, force_ascii=False, default_handler=str))
            kept += int(mask.sum())
            start += len(chunk)
    return {"file": str(target), "kept": kept, "dropped": int(drop.sum()), "cuts": cuts}


def _mean(x: Any) -> float | None:
    try:
        x = float(x.mean()) if hasattr(x, "mean") else float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else round(x, 6)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _histogram(vals: pd.Series, path: Path, title: str, cut: float | None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    v = vals.dropna()
    ax.hist(v, bins=min(60, max(10, len(v) // 10)), color="C0", alpha=0.85)
    ax.axvline(float(v.mean()) if len(v) else 0.0, color="black", lw=1, label=f"mean {v.mean():.3g}")
    if cut is not None:
        ax.axvline(cut, color="C3", ls="--", lw=1, label=f"cut {cut:.3g}")
    ax.set(xlabel="score (projection on v̂)", ylabel="samples", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
