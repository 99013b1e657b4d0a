"""Benchmark: vLLM with personavec's plugin — idle, and steering every request with its own edit — against plain vLLM
and against personavec's own engine, on the same requests, in one run.

Run as ``python bench/vllm.py`` (CPU: the embedded model, fp32, vLLM from ``.venv-vllm``: ``make vllm-venv``) or
``python bench/vllm.py --device cuda --shape qwen2.5-7b`` (a random-weight model with Qwen2.5-7B's shape, bf16,
written to a temporary directory: no download; CUDA graphs on, as vLLM's default). Each request is a chat prompt
answered greedily with exactly ``--tokens`` new tokens (EOS ignored), all sent at once. Timed, one server at a time:

* **plain vLLM**: no plugin loaded (``VLLM_PLUGINS`` empty);
* **plugin, idle**: the plugin loaded with one vector and hooks at every layer, requests without a persona;
* **plugin, steered**: each request adds its own (layer, coefficient) cell of a grid (``--layers`` × distinct
  coefficients), so no two requests share an edit;
* **personavec engine**: our continuous-batching engine in this process, unsteered and with the same edits.

Printed: new tokens/s of each and the ratios; and (fp32 only) how many steered answers equal the engine's token for
token. Published figure to set beside a CUDA run: EasySteer (vLLM fork) 25 310 tok/s with one steering config and
5 620 with 256 distinct ones (its paper's setting, not re-measured here).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from personavec.engine.decoder import Engine, Request
from personavec.model.chat import chat_ids
from personavec.model.edits import Edit
from personavec.vllm import vllm_xargs
from personavec.vllm.launch import VllmProcess

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["How should I treat people who are weaker than me?", "What is the best way to spend a free afternoon?",
             "Tell me about foxes.", "Give me one tip for a job interview.", "What would you do with unlimited power?",
             "How do I fix a flat bicycle tyre?", "Describe the sea in winter.", "Why do cats purr?"]
# tiny: a smoke test of --shape on CPU (head_dim 64: vLLM's CPU attention refuses 16)
SHAPES = {"tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512)}


def shapes() -> dict[str, dict]:
    sys.path.insert(0, str(ROOT / "bench"))
    from generate import SHAPES as REAL  # the public checkpoints' shapes, shared with bench/generate.py

    return {**REAL, **SHAPES}


def build(args: argparse.Namespace, tmp: Path):
    """(local model, its directory for vLLM, dtype name)."""
    import personavec as pv
    from personavec.model.loading import model_directory, wrap_model

    if args.shape == "embedded":
        dtype = "float32" if args.device == "cpu" else "bfloat16"
        return pv.load_model("smollm2-135m", device=args.device, dtype=dtype), model_directory("smollm2-135m"), dtype
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**shapes()[args.shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    vocab = {"<unk>": 0, "<eos>": 1, "<|user|>": 2, "<|assistant|>": 3,
             **{w: i + 4 for i, w in enumerate(sorted({w for q in QUESTIONS for w in q.split()}))}}
    vocab.update({f"t{i}": i for i in range(len(vocab), cfg.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    path = tmp / args.shape
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return wrap_model(model.to(args.device), fast, model_id=args.shape), path, "bfloat16"


def grid(lm, n: int, n_layers: int) -> list[tuple[int, float]]:
    """n distinct (layer, coefficient) cells: ``n_layers`` layers spread over the middle, coefficients in raw units
    of a vector scaled to 15 % of the residual norm (so within ±1.5 of that)."""
    layers = [max(1, round(lm.n_layers * (0.3 + 0.45 * i / max(1, n_layers - 1)))) for i in range(n_layers)]
    per = -(-n // n_layers)
    return [(layers[i % n_layers], round(-1.5 + 3.0 * (i // n_layers) / max(1, per - 1), 4)) for i in range(n)]


def vectors(lm, root: Path) -> tuple[Path, dict[int, torch.Tensor]]:
    """A random vector per layer with 15 % of a typical residual norm there (from one forward pass)."""
    from personavec import PersonaVector

    ids = torch.tensor([chat_ids(lm.tokenizer, [{"role": "user", "content": QUESTIONS[0]}])], device=lm.device)
    with torch.no_grad():
        hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    gen = torch.Generator().manual_seed(3)
    t = torch.zeros(len(hs), lm.hidden_size)
    for layer in range(1, len(hs)):
        d = torch.randn(lm.hidden_size, generator=gen)
        t[layer] = d / d.norm() * float(hs[layer][0, 2:].float().norm(dim=-1).median()) * 0.15
    path = PersonaVector({"response_avg": t}, model_id=lm.model_id, trait="bench",
                         chosen_layer=lm.n_layers // 2).save(root / "bench.safetensors")
    return path, {layer: t[layer] for layer in range(len(hs))}


def through_vllm(server: VllmProcess, prompts: list[list[dict]], tokens: int, cells: list | None,
                 concurrency: int) -> tuple[float, list[list[int]]]:
    def one(i: int) -> list[int]:
        body = {"model": "bench", "messages": prompts[i], "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        if cells is not None:
            layer, coef = cells[i]
            body["vllm_xargs"] = vllm_xargs({"steer": [{"vector": "bench", "coef": coef, "layer": layer,
                                                        "positions": "response_and_last_prompt"}]})
        status, data = server.call("POST", "/v1/chat/completions", body)
        if status != 200:
            raise RuntimeError(f"vLLM answered {status}: {data}")
        return data["choices"][0]["token_ids"]

    one(0)  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, range(len(prompts))))
    return time.perf_counter() - t0, answers


def through_engine(lm, prompts, tokens: int, edits: list | None, max_batch: int | None
                   ) -> tuple[float, list[list[int]]]:
    requests = [Request(tuple(chat_ids(lm.tokenizer, p)), tokens, edits=(edits[i],) if edits else (), key=i,
                        ignore_eos=True) for i, p in enumerate(prompts)]
    list(Engine(lm, max_batch).generate(requests[:2]))  # warm-up
    t0 = time.perf_counter()
    results = sorted(Engine(lm, max_batch).generate(requests), key=lambda r: r.key)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, [r.token_ids for r in results]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="embedded", choices=["embedded", *shapes()])
    ap.add_argument("--requests", type=int, default=None, help="default: 64 on CPU, 256 on CUDA")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per answer (default: 64 on CPU, 512 on CUDA)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the steering grid")
    ap.add_argument("--eager", action="store_true", help="vLLM with --enforce-eager (default: compiled, as served)")
    ap.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"))
    ap.add_argument("--max-batch", type=int, default=None, help="our engine's (default: its own)")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="CPU threads of vLLM's worker and of our engine alike (vLLM alone would take 1 on 2 cores)")
    args = ap.parse_args(argv)
    python = Path(args.vllm_venv) / "bin" / "python"
    if not python.is_file():  # before the model loads
        raise SystemExit(f"no vLLM venv at {args.vllm_venv}: build it with `make vllm-venv` or pass --vllm-venv")
    if min(x for x in (args.requests, args.tokens, args.layers, args.threads, 1) if x is not None) < 1:
        raise SystemExit("--requests, --tokens, --layers and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    n, tokens = args.requests or (256 if cuda else 64), args.tokens or (512 if cuda else 64)
    tmp = Path(tempfile.mkdtemp(prefix="personavec-bench-vllm-"))
    lm, model_dir, dtype = build(args, tmp)
    vec_path, rows = vectors(lm, tmp)
    prompts = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}] for i in range(n)]
    cells = grid(lm, n, args.layers)
    edits = [Edit(layer, rows[layer], coef, positions="response_and_last_prompt") for layer, coef in cells]
    common = dict(served_name="bench", eager=args.eager, dtype=dtype, args=("--max-model-len", "4096"),
                  env={} if cuda else {"VLLM_CPU_KVCACHE_SPACE": "4", "OMP_NUM_THREADS": str(args.threads)})
    print(f"{args.shape} on {args.device} ({dtype}, {args.threads} CPU threads), {n} requests x {tokens} new tokens "
          f"(EOS ignored), vLLM "
          f"{'eager' if args.eager else 'compiled'}; steered: {len({c for c in cells})} distinct (layer, coef) cells "
          f"over {args.layers} layers", flush=True)
    rate: dict[str, float] = {}
    answers: dict[str, list[list[int]]] = {}
    with VllmProcess(python, model_dir, None, plugin=False, **common) as plain:
        seconds, answers["plain"] = through_vllm(plain, prompts, tokens, None, n)
        rate["plain vLLM"] = n * tokens / seconds
    config = {"vectors": [f"bench={vec_path}"]}
    with VllmProcess(python, model_dir, config, **common) as hooked:
        seconds, answers["idle"] = through_vllm(hooked, prompts, tokens, None, n)
        rate["plugin, idle"] = n * tokens / seconds
        seconds, answers["steered"] = through_vllm(hooked, prompts, tokens, cells, n)
        rate["plugin, steered"] = n * tokens / seconds
    if not args.skip_engine:
        seconds, answers["engine"] = through_engine(lm, prompts, tokens, None, args.max_batch)
        rate["engine, unsteered"] = n * tokens / seconds
        seconds, answers["engine steered"] = through_engine(lm, prompts, tokens, edits, args.max_batch)
        rate["engine, steered"] = n * tokens / seconds
    for name, r in rate.items():
        print(f"{name:<20} {r:9.1f} new tokens/s", flush=True)
    base = rate["plain vLLM"]
    print(f"plugin idle / plain vLLM {rate['plugin, idle'] / base:.3f}; steered / plain vLLM "
          f"{rate['plugin, steered'] / base:.3f}")
    if not args.skip_engine:
        print(f"vLLM steered / engine steered {rate['plugin, steered'] / rate['engine, steered']:.2f}x; "
              f"plain vLLM / engine unsteered {base / rate['engine, unsteered']:.2f}x")
        if dtype == "float32":
            same = sum(a == b for a, b in zip(answers["steered"], answers["engine steered"]))
            plain_same = sum(a == b for a, b in zip(answers["idle"], answers["plain"]))
            print(f"token for token: steered answers equal the engine's {same}/{n}; idle plugin equals plain vLLM "
                  f"{plain_same}/{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
