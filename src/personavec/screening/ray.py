"""ΔP screening on Ray Data: the same chunk function as the local path, on model actors.

Chunks are formed from global row numbers exactly as locally, so both paths produce the same table. Each actor
loads the model and vectors once, scores whole chunks and writes their parts into the shared output directory;
its cache of base answers stays on its own node's local disk.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import PersonavecError
from ..files import locked
from ..model.loading import model_id_for
from ..vectors.probe import Probe
from .features import check_sae
from .scoring import (
    DEFAULT_CONFIG,
    ScreenConfig,
    assemble,
    base_answer_cache,
    check_settings,
    done_chunks,
    part_path,
    screen_chunk,
    throughput,
    write_part,
)


class _RayScreenWorker:
    """A Ray Data actor: loads the model and vectors once, then scores whole chunks and writes their parts."""

    def __init__(self, model: str, device: str | None, dtype: str | None, vectors: list[dict[str, Any]],
                 cfg: dict[str, Any], out_dir: str, sae: dict[str, Any] | None = None) -> None:
        from ..model.loading import load_model
        from ..sae.formats import load_sae
        from ..vectors.formats import load_vector

        self.lm = load_model(model, device=device, dtype=dtype)
        self.probes = [Probe(v["name"], load_vector(v["path"], self.lm.n_layers), tuple(v["layers"]), v.get("pooling"))
                       for v in vectors]
        for p in self.probes:
            p.vector.check_compatible(self.lm)
        self.cfg = ScreenConfig(**cfg)
        self.sae = None if sae is None else load_sae(sae["path"], layer=sae.get("layer"))
        self.out = Path(out_dir)
        # a cache of its own on the node's local disk: SQLite's WAL breaks on the network file systems that a
        # cluster's shared output directory often lives on (the answers themselves are kept in the parts)
        self.cache = None
        if self.cfg.mode == "delta":
            import tempfile

            self._cache_dir = tempfile.TemporaryDirectory(prefix="personavec-base-answers-")
            self.cache = base_answer_cache(Path(self._cache_dir.name) / "base_answers.sqlite")

    def __call__(self, group: pd.DataFrame) -> pd.DataFrame:
        group = group.sort_values("__pv_row", kind="stable")
        k = int(group["__pv_chunk"].iloc[0])
        first = int(group["__pv_row"].iloc[0])
        rows = group.drop(columns=["__pv_row", "__pv_chunk"]).to_dict("records")
        df = screen_chunk(self.lm, rows, first, self.probes, self.cfg, self.cache, self.sae)
        write_part(df, part_path(self.out, k))
        s = df.attrs["stats"]
        return pd.DataFrame({"chunk": [k], "rows": [len(df)], "tokens": [s["tokens"]],
                             "generated_tokens": [s["generated_tokens"]]})


def screen_file_ray(model: str, path: str | os.PathLike, vectors: Sequence[dict[str, Any]],
                    out_dir: str | os.PathLike, cfg: ScreenConfig = DEFAULT_CONFIG, workers: int = 1,
                    device: str | None = None, dtype: str | None = None, address: str | None = None,
                    cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                    sae: dict[str, Any] | None = None) -> dict[str, Any]:
    """The same screening on Ray Data: chunks of global rows → ``workers`` model actors → the same parts.

    ``vectors``: ``{"name", "path", "layers", "pooling"}`` per probe (workers load them). ``sae``: ``{"path",
    "layer"}`` of an SAE (any format :func:`~personavec.sae.formats.load_sae` reads; ``layer`` None: the file's),
    loaded by the driver to check it and by every worker, whose rows then carry the features behind each score.
    ``address``: an existing Ray cluster (``auto`` or ``ray://...``); default: a local Ray. The output directory
    must be on storage every worker can write (a shared filesystem on a multi-node cluster, the SAE's and the
    vectors' files too); each worker keeps its cache of base answers on its own node's local disk.
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
    n_layers, hidden_size = model_shape(model)[:2]
    probes = [Probe(v["name"], load_vector(v["path"], n_layers), tuple(v["layers"]), v.get("pooling")) for v in vectors]
    the_sae = None
    if sae is not None:
        from ..sae.formats import load_sae

        sae = {"path": str(Path(sae["path"]).resolve()), "layer": sae.get("layer")}
        the_sae = load_sae(sae["path"], layer=sae["layer"])
        check_sae(the_sae, probes, cfg.mode, n_layers, hidden_size)
    with locked(out, "the screening (--out)"):
        check_settings(out, path, probes, cfg, model_id_for(model), the_sae)
        return _screen_ray(ray, model, path, vectors, out, cfg, workers, device, dtype, address, cpus_per_worker,
                           gpus_per_worker, sae)


def _screen_ray(ray: Any, model: str, path: Path, vectors: Sequence[dict[str, Any]], out: Path, cfg: ScreenConfig,
                workers: int, device: str | None, dtype: str | None, address: str | None, cpus_per_worker: float,
                gpus_per_worker: float, sae: dict[str, Any] | None) -> dict[str, Any]:
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
                                   "cfg": cfg.to_dict(), "out_dir": str(out.resolve()), "sae": sae},
        ).to_pandas() if len(done) < n_chunks else pd.DataFrame(columns=["rows", "tokens", "generated_tokens"])
    finally:
        if started:
            ray.shutdown()
    assemble(out, n_chunks)
    stats = {"rows": int(summary["rows"].sum()), "tokens": int(summary["tokens"].sum()),
             "generated_tokens": int(summary["generated_tokens"].sum())}
    return {**throughput(stats, time.perf_counter() - t0), "workers": workers}
