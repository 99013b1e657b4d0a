"""LoRA supervised fine-tuning on chat data, with training-time interventions on the residual stream.

* Loss on assistant tokens only (:mod:`.conversations`).
* Paper defaults (:class:`TrainConfig`): rsLoRA rank 32, α 64, dropout 0 on every linear projection inside
  the decoder blocks (attention + MLP), AdamW lr 1e-5, 1 epoch, batch 2 × grad-accum 8, 5 warm-up steps,
  weight decay 0.01, linear schedule, max length 2048. The loss of one optimizer step is the mean over all
  assistant tokens of its micro-batches.
* Interventions (:mod:`personavec.model.edits`) are active inside training forward passes only:
  *preventative steering* adds α·v at chosen layers on every position, *CAFT* ablates v̂. They are hooked on
  the decoder blocks found through the PEFT wrapper (no module-name guessing) and are removed before any
  evaluation or saving; the saved adapter holds LoRA weights only.
* Checkpoints every ``save_every`` optimizer steps (adapter weights, optimizer, scheduler, RNG, step) are
  written to a temporary directory and renamed, so a killed run resumes from its last checkpoint and ends
  with exactly the weights an uninterrupted run would have (data order depends only on seed and epoch).

About 400 lines: the training loop, its interventions and its checkpoints share state and are read together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PersonavecError, finite, shown, whole
from ..files import atomic_dir, claim_settings, locked, read_json, write_json
from ..model.edits import Edit, check_edits, steer
from ..model.layers import decoder_layers
from ..model.loading import LoadedModel, check_loaded, pad_token_id
from .conversations import Example, encode_chats, read_chats

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
SCHEDULES = ("linear", "constant", "cosine")


@dataclass
class TrainConfig:
    """Fine-tuning settings; the defaults are the paper's (Qwen2.5-7B / Llama-3.1-8B, LoRA)."""

    rank: int = 32
    lora_alpha: float = 64.0
    dropout: float = 0.0
    rslora: bool = True
    target_modules: list[str] | None = None  # None: every linear projection inside the decoder blocks
    lr: float = 1e-5
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 8
    warmup_steps: int = 5
    weight_decay: float = 0.01
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    max_length: int = 2048
    seed: int = 0
    save_every: int = 20  # optimizer steps between checkpoints; 0 = no intermediate checkpoints
    keep_checkpoints: int = 2
    max_steps: int | None = None  # stop early after this many optimizer steps (the schedule is unchanged)

    def __post_init__(self) -> None:
        """Every field type-checked and range-checked, naming the field (a config file's "four" for ``rank`` is
        one line, not a traceback from deep inside training)."""
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_length"):
            setattr(self, name, whole(getattr(self, name), name, low=1))
        for name in ("warmup_steps", "save_every", "keep_checkpoints"):
            setattr(self, name, whole(getattr(self, name), name, low=0))
        self.seed = whole(self.seed, "seed")
        if self.max_steps is not None:
            self.max_steps = whole(self.max_steps, "max_steps", low=1)
        for name in ("lora_alpha", "dropout", "lr", "weight_decay", "max_grad_norm"):
            setattr(self, name, finite(getattr(self, name), name))
        if self.lr < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise PersonavecError("lr, weight_decay and max_grad_norm must not be negative")
        if not 0 <= self.dropout < 1:
            raise PersonavecError(f"dropout must be at least 0 and below 1, not {shown(self.dropout)}")
        if not isinstance(self.rslora, bool):
            raise PersonavecError(f"rslora must be true or false, not {shown(self.rslora)}")
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise PersonavecError(f"schedule must be one of {', '.join(SCHEDULES)}, not {shown(self.schedule)}")
        if self.target_modules is not None and (not isinstance(self.target_modules, list) or not self.target_modules
                                                or not all(isinstance(m, str) for m in self.target_modules)):
            raise PersonavecError("target_modules must be a list of module names (e.g. [\"q_proj\", \"v_proj\"]) "
                                  f"or absent, not {shown(self.target_modules)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that define a fine-tune's result (not those that may change between a run and its
        resumption: ``max_steps``, ``save_every``, ``keep_checkpoints``)."""
        d = self.to_dict()
        for k in ("max_steps", "save_every", "keep_checkpoints"):
            d.pop(k)
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        known = {f.name for f in fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise PersonavecError(f"unknown training setting(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return TrainConfig(**{**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        """Read settings from a JSON or TOML file (keys as in this dataclass); missing keys keep the defaults."""
        p = Path(path)
        if not p.exists():
            raise PersonavecError(f"training config {p} does not exist")
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix.lower() == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (ValueError, ImportError) as e:
            raise PersonavecError(f"{p}: cannot parse the training config ({e})") from None
        if not isinstance(data, dict):
            raise PersonavecError(f"{p}: the training config must be an object of settings")
        try:
            return cls().replace(**data)
        except PersonavecError as e:
            raise PersonavecError(f"{p}: {e}; fix that key in the file") from None


# ---------------------------------------------------------------------------------------------------------
# LoRA


def default_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of every linear projection inside the decoder blocks (attention and MLP)."""
    names: set[str] = set()
    for block in decoder_layers(model):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
                names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise PersonavecError("found no linear projections inside the decoder blocks; pass target_modules")
    return sorted(names)


@contextlib.contextmanager
def _peft_wrapping() -> Iterator[None]:
    """peft (0.21, the newest) asks every model it wraps for ``is_gradient_checkpointing``, an alias transformers 5
    deprecated with a FutureWarning that the user can do nothing about; that one warning is not shown while peft
    wraps a model (every other warning is)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap ``model`` with fresh LoRA adapters (peft), seeded by ``cfg.seed``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PersonavecError("fine-tuning needs peft: pip install peft") from None
    targets = cfg.target_modules or default_target_modules(model)
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    with _peft_wrapping():
        return get_peft_model(model, lcfg)


def adapter_path(adapter_dir: str | os.PathLike) -> Path:
    """The saved adapter in ``adapter_dir`` (a fine-tune's output directory, or its ``adapter/``), checked without
    loading anything."""
    p = Path(adapter_dir)
    if (p / ADAPTER / "adapter_config.json").exists():
        p = p / ADAPTER
    if not (p / "adapter_config.json").exists():
        raise PersonavecError(f"{adapter_dir} holds no adapter (adapter_config.json); point at a fine-tune's output")
    return p


def load_adapter(lm: LoadedModel, adapter_dir: str | os.PathLike) -> LoadedModel:
    """The base model of ``lm`` with a saved adapter applied (a new LoadedModel; ``lm.model`` is wrapped)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise PersonavecError("loading an adapter needs peft: pip install peft") from None
    p = adapter_path(adapter_dir)
    with _peft_wrapping():
        model = PeftModel.from_pretrained(lm.model, str(p)).eval()
    from dataclasses import replace

    return replace(lm, model=model, extra={**lm.extra, "adapter": str(p)})


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------
# the training loop


def _micro_batches(n: int, cfg: TrainConfig, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]


def plan_steps(n: int, cfg: TrainConfig) -> list[list[list[int]]]:
    """Optimizer steps, each a list of micro-batches (lists of example indices), over all epochs."""
    steps = []
    for epoch in range(cfg.epochs):
        mbs = _micro_batches(n, cfg, epoch)
        steps += [mbs[i:i + cfg.grad_accum] for i in range(0, len(mbs), cfg.grad_accum)]
    return steps


def _collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        labels[b, :n] = torch.tensor(e.labels)
        attn[b, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def _loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions of a right-padded batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    target = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       ignore_index=-100, reduction="sum")


def intervention_edits(vec: Any, layers: Sequence[int], prevent_coef: float | None = None,
                       caft: bool = False) -> list[Edit]:
    """Training-time edits from a PersonaVector: preventative steering (add ``prevent_coef``·v) and/or CAFT
    (ablate v̂) at each of ``layers``, on every position. Both at once is refused: the ablation, applied after the
    addition at the same layer, removes the added steering again."""
    if prevent_coef and caft:
        raise PersonavecError(f"prevent_coef={prevent_coef:g} with caft=True cancel each other: CAFT ablates the "
                              "vector's direction right after the preventative steering adds it at the same layers; "
                              "use one of them")
    edits = [Edit(layer=x, direction=vec.get(x), coef=prevent_coef) for x in layers] if prevent_coef else []
    return edits + ([Edit(layer=x, direction=vec.get(x), kind="ablate") for x in layers] if caft else [])


def check_training_edits(edits: Sequence[Edit]) -> None:
    """Training-time edits act on every position, and none is undone by a later one (an ablation of the direction
    an earlier edit adds at the same layer leaves nothing of it)."""
    for e in edits:
        if e.positions != "all":
            raise PersonavecError("training-time interventions act on every position (positions='all'); "
                                  f"got positions={e.positions!r}")
    for i, e in enumerate(edits):
        for later in edits[i + 1:]:
            if e.kind == "add" and later.kind == "ablate" and later.layer == e.layer:
                cos = nn.functional.cosine_similarity(e.direction.float().flatten(),
                                                      later.direction.float().flatten(), dim=0)
                if float(cos.abs()) > 0.999:
                    raise PersonavecError(f"the ablation at layer {e.layer} removes the steering added there just "
                                          "before it (CAFT cancels preventative steering along the same direction); "
                                          "use one of them")


@contextlib.contextmanager
def training_interventions(model: nn.Module, edits: Sequence[Edit]) -> Iterator[None]:
    """The edits, active for the duration of one training forward pass."""
    if not edits:
        yield
        return
    with steer(model, list(edits)):
        yield


def describe_edits(edits: Sequence[Edit]) -> list[dict[str, Any]]:
    return [{"kind": "preventative_steering" if e.kind == "add" else "caft", "layer": e.layer,
             "coef": e.coef if e.kind == "add" else None, "direction_norm": float(e.direction.norm())}
            for e in edits]


@dataclass
class TrainResult:
    out_dir: Path
    adapter_dir: Path
    steps: int
    losses: list[float]
    n_examples: int
    n_dropped: int
    seconds: float
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)




def _save_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int, losses: list[float],
                     ckpt_root: Path, keep: int) -> None:
    from safetensors.torch import save_file

    with atomic_dir(ckpt_root / f"step-{step:06d}") as tmp:
        save_file({n: t.contiguous() for n, t in trainable_state(model).items()}, str(tmp / "trainable.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, "losses": losses, "scheduler": sched.state_dict()})
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").exists())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = out_dir / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.exists() else []
    return done[-1] if done else None


def _load_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, ckpt: Path) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing or any(n not in params for n in saved):
        raise PersonavecError(f"checkpoint {ckpt} does not match this model/adapter; delete it or use another --out")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t)
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True)["cpu"])
    state = read_json(ckpt / "state.json")
    sched.load_state_dict(state["scheduler"])
    return int(state["step"]), [float(x) for x in state["losses"]]


def finetune(lm: LoadedModel, data: str | os.PathLike | Sequence[Sequence[dict[str, str]]], out_dir: str | os.PathLike,
             config: TrainConfig | None = None, edits: Sequence[Edit] = (), progress: bool | str = True) -> TrainResult:
    """LoRA fine-tune ``lm`` on chats (a table file, or lists of ``{role, content}`` messages) into ``out_dir``,
    resumable; ``edits`` act during training forward passes only (preventative steering, CAFT). The paper's
    settings unless ``config`` says otherwise. Afterwards ``lm`` is the fine-tuned model."""
    check_loaded(lm, "finetune")  # every argument checked before out_dir is made
    if not isinstance(out_dir, (str, os.PathLike)):
        raise PersonavecError(f"finetune's out_dir must be a directory path, not {shown(out_dir)}")
    if config is not None and not isinstance(config, TrainConfig):
        raise PersonavecError(f"finetune's config must be a TrainConfig, e.g. TrainConfig(rank=4), not {shown(config)}")
    edits = check_edits(edits, lm.n_layers, lm.hidden_size)
    check_training_edits(edits)
    if not isinstance(data, (str, os.PathLike)) and (not isinstance(data, (list, tuple)) or not all(
            isinstance(c, (list, tuple)) and all(isinstance(m, dict) for m in c) for c in data)):
        raise PersonavecError(f"finetune's data must be a table file or a list of chats (each a list of "
                              f"{{role, content}} messages), not {shown(data)}")
    chats = read_chats(data) if isinstance(data, (str, os.PathLike)) else [list(c) for c in data]
    return train_lora(lm, chats, config or TrainConfig(), out_dir, edits=edits, progress=progress)


def train_lora(lm: LoadedModel, chats: Sequence[Sequence[dict[str, str]]], cfg: TrainConfig,
               out_dir: str | os.PathLike, edits: Sequence[Edit] = (), progress: bool | str = True,
               resume: bool = True, meta: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune ``lm`` with LoRA on ``chats``; writes ``out_dir/adapter`` (peft format) and ``train.json``.

    ``lm.model`` is wrapped in place with the LoRA adapter (``lm.model`` becomes the PeftModel), so after the
    call ``lm`` *is* the fine-tuned model, without any intervention hooks. ``edits`` are training-time
    interventions (preventative steering: ``Edit(kind="add")``, CAFT: ``Edit(kind="ablate")``).
    """
    with locked(out_dir, "the fine-tune (--out)"):
        return _train_lora(lm, chats, cfg, Path(out_dir), edits, progress, resume, meta)


def _train_lora(lm: LoadedModel, chats: Sequence[Sequence[dict[str, str]]], cfg: TrainConfig, out: Path,
                edits: Sequence[Edit], progress: bool | str, resume: bool, meta: dict[str, Any] | None) -> TrainResult:
    from transformers import get_scheduler

    edits = list(edits)
    check_training_edits(edits)
    max_length = min(cfg.max_length, lm.context_length or cfg.max_length)
    examples, dropped = encode_chats(lm.tokenizer, chats, max_length)
    if not examples:
        raise PersonavecError("no training example has assistant tokens within max_length")
    ident = {"config": cfg.identity(), "n_examples": len(examples), "interventions": describe_edits(edits),
             "data_digest": _digest(examples), **(meta or {})}
    claim_settings(out / "train_config.json", ident, "a fine-tune (of other data?)",
                   "use another --out or delete that directory")

    model = add_lora(lm.model, cfg)
    lm.model = model
    device = lm.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = plan_steps(len(examples), cfg)
    sched = get_scheduler("cosine" if cfg.schedule == "cosine" else
                          "constant_with_warmup" if cfg.schedule == "constant" else "linear",
                          opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=len(steps))
    start, losses = 0, []
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        start, losses = _load_checkpoint(model, opt, sched, ckpt)
    stop_at = len(steps) if cfg.max_steps is None else min(len(steps), cfg.max_steps)
    pad = pad_token_id(lm.tokenizer)
    model.train()
    t0 = time.perf_counter()
    n_tokens = 0
    bar = tqdm(total=stop_at, initial=start, desc=progress if isinstance(progress, str) else "fine-tuning",
               disable=not progress, unit="step")
    try:
        for step in range(start, stop_at):
            mbs = steps[step]
            total = sum(examples[i].n_loss_tokens for mb in mbs for i in mb)
            step_loss = 0.0
            for mb in mbs:
                batch = _collate([examples[i] for i in mb], pad, device)
                with training_interventions(model, edits):
                    loss = _loss_sum(model, batch) / total
                loss.backward()
                step_loss += float(loss.detach())
                n_tokens += int(batch["attention_mask"].sum())
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(step_loss, 6))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            done = step + 1
            if cfg.save_every and done % cfg.save_every == 0 and done < len(steps):
                _save_checkpoint(model, opt, sched, done, losses, out / CHECKPOINTS, cfg.keep_checkpoints)
    finally:
        bar.close()
        model.eval()
    seconds = time.perf_counter() - t0
    adapter_dir = out / ADAPTER
    if stop_at == len(steps):
        with atomic_dir(adapter_dir) as tmp:
            model.save_pretrained(str(tmp))
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    else:  # stopped early (--max-steps): always leave a checkpoint to continue from
        _save_checkpoint(model, opt, sched, stop_at, losses, out / CHECKPOINTS, max(1, cfg.keep_checkpoints))
    result = TrainResult(out_dir=out, adapter_dir=adapter_dir, steps=stop_at, losses=losses,
                         n_examples=len(examples), n_dropped=dropped, seconds=round(seconds, 2), resumed_from=start,
                         extra={"tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None,
                                "total_steps": len(steps), "complete": stop_at == len(steps)})
    if stop_at == len(steps):
        write_json(out / "train.json", {**ident, "steps": stop_at, "losses": losses, "seconds": result.seconds,
                                          "resumed_from": start, "n_dropped": dropped, **result.extra})
    return result


def _digest(examples: Sequence[Example]) -> str:
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.ids, e.labels]).encode())
    return h.hexdigest()[:16]


def is_trained(out_dir: str | os.PathLike) -> bool:
    p = Path(out_dir)
    return (p / "train.json").exists() and (p / ADAPTER / "adapter_config.json").exists()
