"""A judge that reads a local Hugging Face model's own distribution over the scores 0–100.

For a judge prompt, the model's probability of answering exactly the integer ``k`` is
``P(k) = Π P(tokens of k) · P(stop | k)``, where the tokens of ``k`` are its canonical tokenization right
after the chat-formatted prompt (so tokenizers that split numbers into several tokens are handled) and
``P(stop | k)`` is the probability that the next token does not continue the number (does not start with
a digit). The score is ``Σ k·P(k) / Σ P(k)``; it is missing when ``Σ P(k) < 0.25`` (the model mostly says
something else, e.g. a refusal). Paths through non-canonical tokenizations of a number are not counted.

Cost per prompt: one forward pass over the prompt, then one batched pass over the short score prefixes
reusing the prompt's KV cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..activations import encode_pairs
from ..models import LoadedModel, format_chat

MIN_MASS = 0.25
SCORES = tuple(range(101))


@dataclass
class ScoreDistribution:
    probs: dict[int, float]  # P(k) for k in 0..100 (unnormalized)

    @property
    def mass(self) -> float:
        return sum(self.probs.values())

    def expected(self, min_mass: float = MIN_MASS) -> float | None:
        m = self.mass
        if m < min_mass or m <= 0:
            return None
        return sum(k * p for k, p in self.probs.items()) / m


class LocalJudge:
    """Judge with a local causal LM (any chat model; stronger is better)."""

    def __init__(self, lm: LoadedModel, chunk: int = 64, min_mass: float = MIN_MASS) -> None:
        self.lm = lm
        self.chunk = chunk
        self.min_mass = min_mass
        self.name = f"local:{lm.model_id}@{lm.revision}"
        vocab = lm.tokenizer.convert_ids_to_tokens(list(range(len(lm.tokenizer))))
        digit = torch.zeros(len(vocab), dtype=torch.bool)
        for i, tok in enumerate(vocab):
            text = lm.tokenizer.convert_tokens_to_string([tok]) if tok is not None else ""
            digit[i] = bool(text) and text[0].isdigit()
        self._continues = digit  # tokens that would extend a number

    def _number_tokens(self, prompt: str) -> list[tuple[int, ...]]:
        encs = encode_pairs(self.lm.tokenizer, [prompt] * len(SCORES), [str(k) for k in SCORES])
        return [e.ids[e.n_prompt:] for e in encs]

    def _continue_mass(self, logprobs: torch.Tensor) -> torch.Tensor:
        cont = self._continues.to(logprobs.device)
        n = min(cont.numel(), logprobs.shape[-1])
        return logprobs[..., :n].exp().masked_fill(~cont[:n], 0.0).sum(-1)

    @torch.no_grad()
    def distribution(self, judge_prompt: str) -> ScoreDistribution:
        """P(k) for every k in 0..100 for one filled rubric."""
        lm = self.lm
        prompt = format_chat(lm.tokenizer, judge_prompt)
        numbers = self._number_tokens(prompt)
        enc = encode_pairs(lm.tokenizer, [prompt], ["0"])[0]
        prompt_ids = torch.tensor([enc.ids[: enc.n_prompt]], device=lm.device)
        out = lm.model(input_ids=prompt_ids, use_cache=True)
        root = out.logits[0, -1].float().log_softmax(-1)
        past = out.past_key_values
        n_prompt = prompt_ids.shape[1]
        # distinct non-empty prefixes of the numbers' token sequences; each needs its next-token distribution
        prefixes = sorted({seq[:i] for seq in numbers for i in range(1, len(seq) + 1)}, key=len)
        dist: dict[tuple[int, ...], torch.Tensor] = {(): root}
        for start in range(0, len(prefixes), self.chunk):
            chunk = prefixes[start:start + self.chunk]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), int(chunk[0][0]), dtype=torch.long, device=lm.device)
            for r, p in enumerate(chunk):
                ids[r, : len(p)] = torch.tensor(p)
            cache = copy.deepcopy(past)
            cache.batch_repeat_interleave(len(chunk))
            pos = torch.arange(n_prompt, n_prompt + width, device=lm.device).expand(len(chunk), -1)
            attn = torch.ones(len(chunk), n_prompt + width, dtype=torch.long, device=lm.device)
            logits = lm.model(input_ids=ids, past_key_values=cache, position_ids=pos, attention_mask=attn,
                              use_cache=True).logits.float().log_softmax(-1)
            for r, p in enumerate(chunk):
                dist[p] = logits[r, len(p) - 1]  # right padding after p cannot affect it (causal)
        probs: dict[int, float] = {}
        for k, seq in zip(SCORES, numbers):
            lp = sum(float(dist[seq[:i]][t]) for i, t in enumerate(seq))
            stop = 1.0 - float(self._continue_mass(dist[seq]))
            probs[k] = float(torch.tensor(lp).exp()) * max(stop, 0.0)
        return ScoreDistribution(probs)

    def score(self, prompts: Sequence[str], progress: bool | str = False,
              on_result: Callable[[int, float | None], None] | None = None) -> list[float | None]:
        desc = progress if isinstance(progress, str) else "judging"
        out: list[float | None] = []
        for i, p in enumerate(tqdm(prompts, desc=desc, disable=not progress, unit="prompt")):
            out.append(self.distribution(p).expected(self.min_mass))
            if on_result is not None:
                on_result(i, out[-1])
        return out
