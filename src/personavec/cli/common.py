"""What the command groups share: the parser class, number and layer parsing, model and vector loading, and the
arguments of a run (taken by run, monitor, finetune-experiment and screen-experiment)."""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..errors import PersonavecError, as_typed

log = logging.getLogger("personavec")


def user_text(text: str, what: str) -> str:
    """Text from the command line or stdin as the model should read it: bytes that were not UTF-8 (which Python
    keeps as lone surrogates, and a tokenizer refuses) become U+FFFD (�), with a warning naming ``what``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "replace")
    log.warning("%s is not UTF-8 text; its undecodable bytes are read as U+FFFD (�)", what)
    return raw.decode("utf-8", "replace")


def parse_layers(text: str | None, flag: str = "--layers") -> list[int] | None:
    """``all`` / None → every layer; ``20``; ``4-8``; ``4,8,12``; combinations like ``1,4-6``. Errors name ``flag``."""
    if text is None or text.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise PersonavecError(f"{flag} {as_typed(text)}: the range {part} runs backwards (it holds no "
                                          f"layer); write it {hi}-{lo}")
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise PersonavecError(f"{flag} {as_typed(text)} is not a list of layers; write e.g. 20, 4-8, 4,8,12, 1,4-6 "
                              "or all") from None
    if not out:
        raise PersonavecError(f"{flag} {as_typed(text)} names no layer; write e.g. 20, 4-8, 4,8,12, 1,4-6 or all")
    return out


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``personavec: error: …``), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"personavec: error: {self.prog}: {_as_typed_usage(message)} (see {self.prog} --help)\n")


def _as_typed_usage(message: str) -> str:
    """argparse's usage messages with the values as typed, not as Python reprs: ``invalid choice: 'foo' (choose from
    'raw', 'norm')`` becomes ``invalid choice: foo (choose from raw, norm)``, ``invalid int value: 'x'`` becomes ``x is
    not a whole number``."""
    import ast
    import re

    try:
        m = re.fullmatch(r"(.*: )?invalid choice: (.*) \(choose from (.*)\)", message, re.S)
        if m:
            try:  # reprs ('raw', 'norm') up to Python 3.12.7; bare (raw, norm) from 3.12.8 and 3.13.1 on
                choices = ast.literal_eval(f"({m[3]},)")
            except (ValueError, SyntaxError):
                choices = m[3].split(", ")
            return f"{m[1] or ''}invalid choice: {as_typed(ast.literal_eval(m[2]))} (choose from " \
                   f"{', '.join(as_typed(c) for c in choices)})"
        m = re.fullmatch(r"(.*: )?invalid (int|float) value: (.*)", message, re.S)
        if m:
            kind = "a whole number" if m[2] == "int" else "a number"
            return f"{m[1] or ''}{as_typed(ast.literal_eval(m[3]))} is not {kind}"
    except (ValueError, SyntaxError):
        pass
    return message


def finite_float(text: str) -> float:
    """An argparse type: a finite number (NaN and infinities are refused with the usual usage line)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{as_typed(text)} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{as_typed(text)} is not a finite number")
    return x


def _whole_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low``."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{as_typed(text)} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{as_typed(text)} must be at least {low}")
        return n

    return parse


positive_int = _whole_at_least(1)
non_negative_int = _whole_at_least(0)


def finite_floats(text: str) -> list[float]:
    """Comma-separated finite numbers, e.g. ``-4,-2,0,2,4``."""
    return [finite_float(x) for x in text.split(",") if x.strip()]


def device_name(text: str) -> str:
    """An argparse type: a torch device name (cpu, cuda, cuda:1, mps) that this machine has."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{as_typed(text)} is not a device; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{as_typed(text)}: this machine has no CUDA device that torch can use; "
                                         "use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{as_typed(text)}: this machine has CUDA devices 0.."
                                         f"{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{as_typed(text)}: MPS is not available on this machine; use cpu")
    return text


def dtype_name(text: str) -> str:
    """An argparse type: auto or a dtype the loader knows (float32, bfloat16, float16 and their short names)."""
    from ..model.loading import DTYPES

    if text != "auto" and text not in DTYPES:
        raise argparse.ArgumentTypeError(f"{as_typed(text)} is not a dtype; use auto, float32, bfloat16 or float16")
    return text


def vector_file(path: str, flag: str = "--vector") -> Path:
    """A vector file named on the command line, or one line saying what ``flag`` wants instead."""
    p = Path(path)
    wanted = "a vector file (.safetensors, a llama.cpp control vector .gguf, or an official persona_vectors .pt)"
    if p.is_dir():
        raise PersonavecError(f"{flag} {as_typed(path)} is a directory; give {wanted}, e.g. a run's "
                              f"vectors.safetensors")
    if not p.exists():
        raise PersonavecError(f"{flag} {as_typed(path)} does not exist; give {wanted}")
    return p


def out_file(path: str, flag: str = "--out", suffixes: Sequence[str] | None = None) -> Path:
    """An output file named on the command line, checked before any work: its suffix (one of ``suffixes``) and that
    it can be written; errors name ``flag``."""
    from ..files import check_writable

    p = Path(path)
    if p.is_dir():
        raise PersonavecError(f"{flag} {as_typed(path)} is a directory; name a file in it, e.g. "
                              f"{p / ('out' + (suffixes[0] if suffixes else ''))}")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        got = f"ends in {as_typed(p.suffix)}" if p.suffix else "has no suffix"
        endings = suffixes[0] if len(suffixes) == 1 else f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"
        raise PersonavecError(f"{flag} {as_typed(path)} {got}; name a file ending in {endings} "
                              f"(e.g. {p.stem or 'out'}{suffixes[0]})")
    try:
        return check_writable(p)
    except PersonavecError as e:
        raise PersonavecError(f"{flag}: {e}") from None


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name, .gguf file, local directory, or hub id (default: smollm2-135m)")
    p.add_argument("--revision", default=None, help="a hub model's commit, branch or tag (default: main)")
    p.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--dtype", type=dtype_name, default=None,
                   help="auto | float32 | bfloat16 | float16 (default auto: bfloat16 on CUDA and on CPUs with native "
                        "bfloat16, float32 elsewhere)")


def model_vectors(args: argparse.Namespace, paths: Sequence[str]) -> list:
    """Vector files (``.safetensors``, official ``.pt``, llama.cpp ``.gguf``) checked against the model's config,
    before any weights are loaded."""
    from ..model.loading import model_shape
    from ..vectors.formats import load_vector

    n_layers, hidden, _ = model_shape(args.model, args.revision)
    vecs = []
    for path in paths:
        vec = load_vector(vector_file(path), n_layers=n_layers)
        vec.check_shape(n_layers, hidden, args.model)
        vecs.append(vec)
    return vecs


def load_lm(args: argparse.Namespace):
    from ..model.loading import load_model

    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    log.info("model %s: %d layers x %d dims on %s (%s), loaded in %.1fs", lm.model_id, lm.n_layers,
             lm.hidden_size, lm.device, str(lm.dtype).replace("torch.", ""), time.perf_counter() - t0)
    return lm


def named_vectors(args: argparse.Namespace, paths: Sequence[str]) -> dict[str, Any]:
    """Vector files (checked against the model's config) by name: each one's trait where that is known and no other
    file has it, else its file stem; repeated names get a suffix."""
    vecs = model_vectors(args, paths)
    traits = [v.trait for v in vecs]
    named: dict[str, Any] = {}
    for path, vec in zip(paths, vecs):
        name = vec.trait if vec.trait != "unknown" and traits.count(vec.trait) == 1 else Path(path).stem
        while name in named:
            name += "_"
        named[name] = vec
    return named


def _check_specs(args: argparse.Namespace) -> None:
    """The run's judge, sampler and generator specs, refused naming their flag (the library's lines name none)."""
    from ..engine.remote import parse_sampler
    from ..judge.spec import SPECS, parse_spec

    for flag, spec, use in (("--judge", args.judge, SPECS), ("--eval-judge", args.eval_judge, SPECS),
                            ("--sampler", args.sampler, "local or openai:MODEL (with --sampler-base-url)"),
                            ("--generator", args.generator, "openai:MODEL or local:MODEL")):
        if spec is None:
            continue
        try:
            if flag == "--sampler":
                parse_sampler(spec)
            elif flag == "--generator":
                if spec.partition(":")[0] not in ("openai", "local"):
                    raise PersonavecError(spec)
            else:
                parse_spec(spec)
        except PersonavecError:
            raise PersonavecError(f"{flag} {as_typed(spec)} is not one of the kinds it takes; use {use}") from None


def run_from_args(args: argparse.Namespace):
    from dataclasses import replace

    from ..engine.sampling import SamplingConfig
    from ..run.config import NAME, NAME_RULE, RunConfig, quick_sampling
    from ..run.pipeline import Run
    from ..vectors.tables import FilterConfig

    if not NAME.fullmatch(args.trait):
        raise PersonavecError(f"--trait {as_typed(args.trait)}: a trait name {NAME_RULE}")
    _check_specs(args)

    sampling = quick_sampling(args.seed) if args.quick else SamplingConfig(seed=args.seed)
    overrides = {k: v for k, v in (("n_samples", args.n_samples), ("max_new_tokens", args.max_new_tokens),
                                   ("batch_size", args.gen_batch_size), ("temperature", args.temperature))
                 if v is not None}
    sampling = replace(sampling, **overrides)
    cfg = RunConfig(trait=args.trait, description=args.description, model=args.model, judge=args.judge,
                    judge_base_url=args.judge_base_url, judge_concurrency=args.judge_concurrency,
                    eval_judge=args.eval_judge, eval_judge_base_url=args.eval_judge_base_url,
                    generator=args.generator, generator_base_url=args.generator_base_url,
                    artifacts_path=args.artifacts, eval_artifacts_path=args.eval_artifacts, sampling=sampling,
                    eval_samples=args.eval_samples,
                    filter=FilterConfig(args.pos_min, args.neg_max, args.coherence_min), filter_mode=args.filter,
                    batch_size=args.batch_size, select=not args.no_select, quick=args.quick,
                    steer_layers=parse_layers(args.steer_layers, "--steer-layers") if args.steer_layers else None,
                    steer_coefs=args.steer_coefs or None, steer_units=args.steer_units,
                    coherence_min=args.select_coherence_min, mc_path=args.mmlu, device=args.device,
                    dtype=args.dtype, revision=args.revision, sampler=args.sampler,
                    sampler_base_url=args.sampler_base_url, sampler_concurrency=args.sampler_concurrency,
                    sampler_check=not args.no_sampler_check)
    run = Run(cfg, out_root=args.out, run_dir=args.run_dir)
    run.command = "personavec " + " ".join(shlex.quote(a) for a in args.argv)
    return run


def fmt(x: float) -> str:
    return "–" if x != x else f"{x:.1f}"


def train_config(args: argparse.Namespace):
    from ..finetuning.lora import TrainConfig

    base = TrainConfig.load(args.train_config) if args.train_config else TrainConfig()
    return base.replace(lr=args.lr, epochs=args.epochs, rank=args.rank, lora_alpha=args.lora_alpha,
                        batch_size=args.train_batch_size, grad_accum=args.grad_accum, warmup_steps=args.warmup_steps,
                        max_length=args.train_max_length, seed=args.train_seed, save_every=args.save_every,
                        max_steps=args.max_steps, schedule=args.schedule)


def train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults: the paper's; a --train-config JSON/TOML file sets any of them)")
    g.add_argument("--train-config", default=None, help="JSON or TOML file with TrainConfig keys (rank, lr, ...)")
    g.add_argument("--lr", type=finite_float, default=None, help="learning rate (paper: 1e-5)")
    g.add_argument("--epochs", type=positive_int, default=None, help="paper: 1")
    g.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (paper: 32)")
    g.add_argument("--lora-alpha", type=finite_float, default=None, help="LoRA alpha (paper: 64; rsLoRA scaling)")
    g.add_argument("--train-batch-size", type=positive_int, default=None, help="micro-batch size (paper: 2)")
    g.add_argument("--grad-accum", type=positive_int, default=None, help="micro-batches per optimizer step (paper: 8)")
    g.add_argument("--warmup-steps", type=non_negative_int, default=None, help="paper: 5")
    g.add_argument("--schedule", choices=["linear", "constant", "cosine"], default=None, help="paper: linear")
    g.add_argument("--train-max-length", type=positive_int, default=None, help="tokens per conversation (paper: 2048)")
    g.add_argument("--train-seed", type=int, default=None)
    g.add_argument("--save-every", type=non_negative_int, default=None,
                   help="optimizer steps between checkpoints (default 20)")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (resume later)")


def check_experiment_layer(args: argparse.Namespace) -> None:
    """An experiment's ``--layer``, checked against the model's config (no weights loaded) before its run starts: the
    run may take hours, and the experiment would refuse the layer only after it."""
    if getattr(args, "layer", None) is None:
        return
    from ..model.loading import model_shape

    n_layers = model_shape(args.model, args.revision)[0]
    if not 0 <= args.layer <= n_layers:
        raise PersonavecError(f"--layer {args.layer} is out of range: {args.model} has layers 0..{n_layers}")


def experiment_args(p: argparse.ArgumentParser) -> None:
    """What both fine-tuning experiments take: read-out layer, evaluation sampling, training settings."""
    p.add_argument("--layer", type=int, default=None, help="intervention/read-out layer (default: chosen)")
    p.add_argument("--ft-eval-samples", type=positive_int, default=2, help="answers per evaluation question per model")
    p.add_argument("--ft-max-new-tokens", type=positive_int, default=64)
    train_args(p)


def run_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--trait", required=True, help="a built-in trait (evil, sycophantic, hallucinating, impolite, "
                                                   "apathetic, humorous, optimistic) or a new name")
    r.add_argument("--description", default=None, help="one sentence defining a new trait (needs --generator)")
    r.add_argument("--artifacts", default=None, help="artifacts JSON to use instead of built-in/generated ones, or "
                                                     "an official trait_data_extract/<trait>.json file")
    r.add_argument("--eval-artifacts", default=None, help="with an official extraction file: its "
                                                          "trait_data_eval/<trait>.json (found by itself beside it)")
    r.add_argument("--generator", default=None, help="openai:MODEL or local:MODEL, writes artifacts for new traits")
    r.add_argument("--generator-base-url", default=None, help="OpenAI-compatible base URL (or OPENAI_BASE_URL)")
    r.add_argument("--judge", default="local", help="local (the embedded model), local:MODEL, openai:MODEL, "
                                                    "or none (no scores, no filter)")
    r.add_argument("--judge-base-url", default=None, help="OpenAI-compatible base URL (or OPENAI_BASE_URL); "
                                                          "key from OPENAI_API_KEY")
    r.add_argument("--judge-concurrency", type=positive_int, default=8)
    r.add_argument("--sampler", default="local",
                   help="local (default), or openai:MODEL: the contrastive answers from an OpenAI-compatible server "
                        "serving the same weights (vLLM, SGLang, llama.cpp); checked first with a "
                        "greedy probe; steered answers and all activations stay local")
    r.add_argument("--sampler-base-url", default=None, help="the sampler's base URL (or OPENAI_BASE_URL)")
    r.add_argument("--sampler-concurrency", type=positive_int, default=16, help="sampler requests in flight")
    r.add_argument("--no-sampler-check", action="store_true",
                   help="skip the greedy probe that checks the sampler serves the same model (e.g. another precision)")
    r.add_argument("--eval-judge", default=None,
                   help="judge of the experiments' answers (monitor, finetune-experiment, screen-experiment), e.g. "
                        "local:qwen2.5-coder-1.5b (see `make judge-model`); default: --judge. Changing it later "
                        "re-judges the stored answers without regenerating them")
    r.add_argument("--eval-judge-base-url", default=None, help="base URL for an openai: --eval-judge "
                                                               "(default: --judge-base-url)")
    r.add_argument("--quick", action="store_true", help="CPU profile: 2 samples per (question, instruction), "
                                                        "64 new tokens")
    r.add_argument("--n-samples", type=positive_int, default=None,
                   help="answers per (question, instruction); paper: 10")
    r.add_argument("--eval-samples", type=positive_int, default=2,
                   help="held-out answers per side per evaluation question")
    r.add_argument("--max-new-tokens", type=positive_int, default=None, help="paper: 1000")
    r.add_argument("--temperature", type=finite_float, default=None, help="paper: 1.0")
    r.add_argument("--gen-batch-size", type=positive_int, default=None)
    r.add_argument("--batch-size", type=positive_int, default=16, help="extraction batch size")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--filter", choices=["auto", "on", "off"], default="auto",
                   help="the paper's filter: auto (default) applies it when the judge tells pos from neg answers "
                        "apart (trait-score AUROC >= 0.75) and >= 10 pairs survive; on; off")
    r.add_argument("--no-select", action="store_true", help="skip the steered evaluation and layer choice")
    r.add_argument("--steer-layers", default=None, help="layers of the steering grid (default: 4 spread over "
                                                        "the middle of the network)")
    r.add_argument("--steer-coefs", default=None, type=finite_floats,
                   help="comma-separated coefficients in --steer-units, written --steer-coefs=-0.2,0.2 "
                        "(default with --quick: -0.2,-0.1,0,0.1,0.2 in norm units, -4,-2,0,2,4 in raw)")
    r.add_argument("--steer-units", choices=["norm", "raw"], default="norm",
                   help="the grid's coefficients: norm (default; x the typical residual norm at the layer, comparable "
                        "across layers) or raw (x the vector)")
    r.add_argument("--select-coherence-min", type=finite_float, default=50.0,
                   help="the chosen layer/coefficient must keep mean coherence >= this (when the judge scores)")
    r.add_argument("--mmlu", default=None, help="MMLU-format multiple-choice data (CSV per subject, a folder of "
                                                "them, or Parquet) for the capability check; default: a built-in "
                                                "40-question set")
    r.add_argument("--pos-min", type=finite_float, default=50.0)
    r.add_argument("--neg-max", type=finite_float, default=50.0)
    r.add_argument("--coherence-min", type=finite_float, default=50.0)
    r.add_argument("--out", default="runs", help="runs root (default: runs)")
    r.add_argument("--run-dir", default=None, help="exact run directory (default: <out>/<model>/<trait>)")
    model_args(r)
