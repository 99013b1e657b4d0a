"""Benchmark: the sampling engine against the previous path (Hugging Face ``generate`` in fixed batches), one process.

Run as ``python bench/generate.py`` (CPU: the embedded model, answer lengths 16-128) or
``python bench/generate.py --device cuda --shape qwen2.5-1.5b --requests 256`` (a random-weight model with
Qwen2.5-1.5B's or -7B's shape, bf16, built in-process: no download). Every request has its own answer length,
drawn once from a fixed distribution (EOS ignored), so both paths do the same useful work:

* **previous path**: batches of ``--hf-batch`` in request order, each ``generate`` call running to the longest
  answer of its batch (every row waits for it); steering as one ``steer`` context per grid cell;
* **engine**: one stream of requests, continuous batching, each request with its own edit.

Two workloads: unsteered, and steered (a grid of 4 layers × 5 coefficients as per-request edits). Printed: new
(useful) tokens/s of each path, the ratio, and on CUDA the fraction of the decode memory-bandwidth bound (bytes
of weights and KV cache read per decode step over the device's bandwidth).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence

import torch

from personavec.engine.decoder import Engine, Request
from personavec.model.edits import Edit, steer

SHAPES = {  # Hugging Face Qwen2 configurations of the public checkpoints (sizes only; weights are random)
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064),
}
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s (HBM, SXM)


def build(args: argparse.Namespace):
    if args.shape == "embedded":
        import personavec as pv

        return pv.load_model("smollm2-135m", device=args.device, dtype=args.dtype)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from personavec.model.loading import wrap_model

    cfg = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    vocab = {"<unk>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, cfg.vocab_size)}}  # decodes any id
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")), eos_token="<eos>",
                                  pad_token="<eos>")
    return wrap_model(model, tok, model_id=args.shape)


def workload(lm, n: int, lo: int, hi: int, steered: bool, seed: int = 0) -> list[tuple[list[int], int, Edit | None]]:
    """(prompt ids, answer length, edit) per request; lengths log-uniform in [lo, hi]."""
    rng = random.Random(seed)
    vocab = lm.model.config.vocab_size
    layers = [round(lm.n_layers * f) for f in (0.3, 0.45, 0.6, 0.75)]
    coefs = [-4.0, -2.0, 1.0, 2.0, 4.0]
    gen = torch.Generator().manual_seed(seed)
    vecs = {layer: torch.randn(lm.hidden_size, generator=gen) for layer in layers}
    out = []
    for i in range(n):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(24, 64))]
        length = round(lo * (hi / lo) ** rng.random())
        edit = None
        if steered:
            layer, coef = layers[i % len(layers)], coefs[(i // len(layers)) % len(coefs)]
            edit = Edit(layer, vecs[layer] / vecs[layer].norm() * 4.0, coef, positions="response_and_last_prompt")
        out.append((prompt, length, edit))
    return out


def previous_path(lm, jobs, batch: int, by_length: bool = False) -> float:
    """Seconds for ``generate`` in fixed batches (per steering cell), each running to its longest answer;
    ``by_length``: batches of similar lengths (length-bucketed ``generate``, the answer lengths known in advance)."""
    cells: dict[tuple, list] = {}
    for job in sorted(jobs, key=lambda j: j[1]) if by_length else jobs:
        e = job[2]
        cells.setdefault((e.layer, e.coef) if e else None, []).append(job)
    pad = lm.tokenizer.pad_token_id or 0
    t0 = time.perf_counter()
    for key, cell in cells.items():
        for i in range(0, len(cell), batch):
            part = cell[i:i + batch]
            width = max(len(p) for p, _, _ in part)
            ids = torch.full((len(part), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for b, (p, _, _) in enumerate(part):
                ids[b, width - len(p):] = torch.tensor(p)
                attn[b, width - len(p):] = 1
            longest = max(n for _, n, _ in part)
            edits = [part[0][2]] if key else []
            with torch.no_grad(), steer(lm, edits):
                lm.model.generate(input_ids=ids.to(lm.device), attention_mask=attn.to(lm.device),
                                  max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=pad)
    _sync(lm)
    return time.perf_counter() - t0


def engine_path(lm, jobs, max_batch: int | None) -> float:
    requests = [Request(p, n, edits=(e,) if e else (), key=i, ignore_eos=True) for i, (p, n, e) in enumerate(jobs)]
    t0 = time.perf_counter()
    results = list(Engine(lm, max_batch=max_batch).generate(requests))
    _sync(lm)
    assert sum(r.n_tokens for r in results) == sum(n for _, n, _ in jobs)
    return time.perf_counter() - t0


def transformers_cb(lm, jobs) -> tuple[float, int]:
    """Seconds and new tokens for transformers' own continuous batching (``init_continuous_batching``), greedy,
    unsteered: it has no per-request edits or seeds, so it is measured for the unsteered workload only. EOS is not
    ignored here (it stops at the model's end of turn), so its tokens are counted, not assumed."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n, _ in jobs),
                           pad_token_id=lm.tokenizer.pad_token_id or 0)
    manager = lm.model.init_continuous_batching(generation_config=cfg)
    manager.start()
    try:
        t0 = time.perf_counter()
        for i, (p, n, _) in enumerate(jobs):
            manager.add_request(list(p), request_id=str(i), max_new_tokens=n)
        tokens = 0
        for _ in jobs:
            result = manager.get_result(timeout=600)
            tokens += len(result.generated_tokens)
        _sync(lm)
        return time.perf_counter() - t0, tokens
    finally:
        manager.stop(block=True)


def _sync(lm) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def bound(lm, jobs, seconds: float) -> str:
    """The fraction of the memory-bandwidth bound: each decode step reads the weights and the batch's KV cache."""
    if lm.device.type != "cuda":
        return ""
    name = torch.cuda.get_device_name(lm.device)
    bw = next((v for k, v in BANDWIDTH.items() if k in name), None)
    if bw is None:
        return f" (bandwidth of {name} unknown)"
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    cfg = lm.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * lm.dtype.itemsize
    tokens = sum(n for _, n, _ in jobs)
    # a lower bound on time: every generated token needs its share of one weight read plus its own KV history
    batch = min(len(jobs), 256)
    kv = sum((len(p) + n / 2) * n for p, n, _ in jobs) * kv_per_token
    best = (weights * tokens / batch + kv) / bw
    return f"; {best / seconds:.0%} of the memory-bandwidth bound ({name})"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="embedded", choices=["embedded", *SHAPES])
    ap.add_argument("--dtype", default="auto", help="the embedded model's dtype")
    ap.add_argument("--requests", type=int, default=None, help="default: 48 on CPU, 256 on CUDA")
    ap.add_argument("--min-tokens", type=int, default=None, help="default: 16 on CPU, 32 on CUDA")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: 128 on CPU, 1000 on CUDA")
    ap.add_argument("--hf-batch", type=int, default=16, help="the previous path's batch size")
    ap.add_argument("--max-batch", type=int, default=None, help="the engine's (default: its own)")
    ap.add_argument("--skip-previous", action="store_true")
    ap.add_argument("--alternatives", action="store_true",
                    help="also time length-bucketed generate and (unsteered) transformers' continuous batching")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    n = args.requests or (256 if cuda else 48)
    lo, hi = args.min_tokens or (32 if cuda else 16), args.max_tokens or (1000 if cuda else 128)
    lm = build(args)
    print(f"{args.shape} on {lm.device} ({str(lm.dtype).replace('torch.', '')}), {n} requests, answers {lo}-{hi} "
          f"tokens (EOS ignored)")
    engine_path(lm, workload(lm, 4, 4, 8, True), args.max_batch)  # warm-up
    for steered in (False, True):
        jobs = workload(lm, n, lo, hi, steered)
        tokens = sum(x for _, x, _ in jobs)
        t_new = engine_path(lm, jobs, args.max_batch)
        line = f"{'steered (4 layers x 5 coefs, per-request)' if steered else 'unsteered':<42} engine " \
               f"{tokens / t_new:8.1f} new tokens/s{bound(lm, jobs, t_new)}"
        if not args.skip_previous:
            t_old = previous_path(lm, jobs, args.hf_batch)
            line += f" | previous {tokens / t_old:8.1f} tokens/s | ratio {t_old / t_new:.2f}x"
        print(line, flush=True)
        if args.alternatives:
            t_sorted = previous_path(lm, jobs, args.hf_batch, by_length=True)
            print(f"{'':<42} length-bucketed generate {tokens / t_sorted:8.1f} tokens/s", flush=True)
        if args.alternatives and not steered:
            seconds, cb_tokens = transformers_cb(lm, jobs)
            print(f"{'unsteered, transformers continuous batching':<42} {cb_tokens / seconds:8.1f} new tokens/s "
                  f"({cb_tokens} tokens: it stops at EOS)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
