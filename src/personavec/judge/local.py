"""A judge that reads a local Hugging Face model's own distribution over the scores 0–100.

For a judge prompt, the model's probability of answering exactly the integer ``k`` is
``P(k) = Π P(tokens of k) · P(stop | k)``, where the tokens of ``k`` are its canonical tokenization right
after the chat-formatted prompt (so tokenizers that split numbers into several tokens are handled) and
``P(stop | k)`` is the probability that the next token does not continue the number (does not start with
a digit). The score is ``Σ k·P(k) / Σ P(k)``; it is missing when ``Σ P(k) < 0.25`` (the model mostly says
something else, e.g. a refusal). Paths through non-canonical tokenizations of a number are not counted.

Cost per prompt: one forward pass over the prompt, then one pass over the ~110 tokens of the score tree
(all prefixes of "0".."100") reusing the prompt's KV cache with a tree attention mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..model.activations import encode_pairs
from ..model.chat import format_chat
from ..model.layers import cache_kwarg
from ..model.loading import LoadedModel

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

    def __init__(self, lm: LoadedModel, min_mass: float = MIN_MASS) -> None:
        self.lm = lm
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
        """Probability of a token that extends a number, for each row of ``logprobs`` ``[..., vocab]``."""
        if self._continues.device != logprobs.device:
            self._continues = self._continues.to(logprobs.device)
        n = min(self._continues.numel(), logprobs.shape[-1])
        return logprobs[..., :n].exp().masked_fill(~self._continues[:n], 0.0).sum(-1)

    @torch.no_grad()
    def distribution(self, judge_prompt: str) -> ScoreDistribution:
        """P(k) for every k in 0..100 for one filled rubric."""
        lm = self.lm
        prompt = format_chat(lm.tokenizer, judge_prompt)
        numbers = self._number_tokens(prompt)
        enc = encode_pairs(lm.tokenizer, [prompt], ["0"])[0]
        prompt_ids = torch.tensor([enc.ids[: enc.n_prompt]], device=lm.device)
        out = lm.model(input_ids=prompt_ids, use_cache=True)
        dist: dict[tuple[int, ...], torch.Tensor] = {(): out.logits[0, -1].float().log_softmax(-1)}
        # Every distinct non-empty prefix of the numbers' token sequences is one node of a token tree. All nodes
        # go through the model in ONE pass on top of the prompt's KV cache, each attending to the prompt and to
        # its own ancestors only (a tree attention mask), at the position its depth gives it.
        nodes = sorted({seq[:i] for seq in numbers for i in range(1, len(seq) + 1)}, key=lambda p: (len(p), p))
        where = {p: i for i, p in enumerate(nodes)}
        n, n_prompt = len(nodes), prompt_ids.shape[1]
        allowed = torch.zeros(1, 1, n, n_prompt + n, dtype=torch.bool, device=lm.device)
        allowed[..., :n_prompt] = True
        for i, p in enumerate(nodes):
            for j in range(1, len(p) + 1):
                allowed[0, 0, i, n_prompt + where[p[:j]]] = True
        # an additive mask in the model's dtype (0 where allowed, the most negative number elsewhere): every
        # attention implementation adds a float 4-D mask, whereas eager attention would ADD a bool one as 0/1
        mask = torch.zeros(allowed.shape, dtype=lm.dtype, device=lm.device)
        mask.masked_fill_(~allowed, torch.finfo(lm.dtype).min)
        ids = torch.tensor([[p[-1] for p in nodes]], device=lm.device)
        pos = torch.tensor([[n_prompt + len(p) - 1 for p in nodes]], device=lm.device)
        logits = lm.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                          **{cache_kwarg(lm.model): out.past_key_values}).logits[0].float().log_softmax(-1)
        # row 0: the distribution right after the prompt; row 1 + i: after node i. Every number needs the log-prob
        # of each of its tokens (one gather) and the chance of stopping after its last token (one reduction), so
        # the device is read once, not once per number.
        rows = torch.cat([dist[()].unsqueeze(0), logits])
        row = {(): 0, **{p: i + 1 for i, p in enumerate(nodes)}}
        steps = [(k, row[seq[:i]], t) for k, seq in enumerate(numbers) for i, t in enumerate(seq)]
        step_lp = rows[torch.tensor([r for _, r, _ in steps], device=rows.device),
                       torch.tensor([t for _, _, t in steps], device=rows.device)]
        lp = torch.zeros(len(numbers), dtype=torch.float64, device=rows.device).index_add_(
            0, torch.tensor([k for k, _, _ in steps], device=rows.device), step_lp.double())
        stop = 1.0 - self._continue_mass(rows[torch.tensor([row[seq] for seq in numbers], device=rows.device)])
        p_k = (lp.exp() * stop.double().clamp(min=0.0)).tolist()
        return ScoreDistribution(dict(zip(SCORES, p_k)))

    def score(self, prompts: Sequence[str], progress: bool | str = False,
              on_result: Callable[[int, float | None], None] | None = None) -> list[float | None]:
        desc = progress if isinstance(progress, str) else "judging"
        out: list[float | None] = []
        for i, p in enumerate(tqdm(prompts, desc=desc, disable=not progress, unit="prompt")):
            out.append(self.distribution(p).expected(self.min_mass))
            if on_result is not None:
                on_result(i, out[-1])
        return out
