"""The screening's report: dataset-level means, histograms, the top and bottom samples, and filtered data."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..files import atomic_write, escape_line_ends, iter_chunks, jsonl_line, save_figure, write_json
from ..vectors.probe import Probe
from .scoring import ScreenConfig

#: per-row lists (the SAE features carrying a score, :mod:`.features`), not scores
LIST_COLUMNS = (":sae_features", ":sae_terms")


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
    score_cols = [c for c in table.columns if "@L" in c and not c.endswith(LIST_COLUMNS)]
    feature_cols = [c for c in table.columns if c.endswith(LIST_COLUMNS)]
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
                extra = {"row": int(r), **{c: _mean(scores.at[r, c]) for c in score_cols},
                         **{c: [round(float(x), 6) if c.endswith("terms") else int(x) for x in scores.at[r, c]]
                            for c in feature_cols}}
                if "base_answer" in scores.columns:
                    extra["base_answer"] = scores.at[r, "base_answer"]
                f.write(jsonl_line({**_jsonable(originals[r]), "screen": extra}))
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
                f.write(escape_line_ends(sub.to_json(orient="records", lines=True, force_ascii=False,
                                                      default_handler=str)))
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
