"""Capability check: multiple-choice accuracy scored from the logprobs of the option letters.

Each question becomes one chat turn (:func:`format_mc`) followed by an assistant prefix (``"Answer:"``); a
single forward pass gives the next-token distribution, and the options are compared by the probability of
their letters. Nothing is generated, so the check is cheap, deterministic and independent of sampling.

Because it only runs forward passes, it works inside :func:`personavec.steering.steer`, which is the point:
measure how much a steering edit costs in general capability::

    base = mc_accuracy(lm, builtin_mc())
    with steer(lm, Edit(layer=12, direction=v, coef=4.0, positions="all")):
        steered = mc_accuracy(lm, builtin_mc())

The scored position is the last prompt token (the end of the assistant prefix), so edits with positions
``all`` or ``prompt`` act on it, while ``response`` edits change nothing here (there are no generated
tokens); ``response_and_last_prompt`` edits only that last position.

Data: :func:`builtin_mc` ships 40 easy general-knowledge questions; :func:`read_mmlu` reads MMLU in its
original per-subject CSV layout or the Parquet layout of the Hugging Face ``cais/mmlu`` dataset.
"""

from __future__ import annotations

import contextlib
import csv
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import PersonavecError
from ..model.layers import last_logits_kwarg
from ..model.loading import LoadedModel, pad_token_id

LETTERS = "ABCDEFGHIJ"
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
ANSWER_PREFIX = "Answer:"
SPLIT_SUFFIXES = ("_test", "_dev", "_val")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class MCQuestion:
    """A multiple-choice question: ``answer`` is the index of the correct entry of ``choices``."""

    question: str
    choices: list[str]
    answer: int
    subject: str = ""

    def __post_init__(self) -> None:
        self.choices = list(self.choices)
        if not MIN_CHOICES <= len(self.choices) <= MAX_CHOICES:
            raise PersonavecError(f"a question needs {MIN_CHOICES} to {MAX_CHOICES} choices, "
                                  f"got {len(self.choices)}: {self.question[:60]!r}")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise PersonavecError(f"answer must be an integer index, got {self.answer!r}")
        if not 0 <= self.answer < len(self.choices):
            raise PersonavecError(f"answer index {self.answer} out of range for {len(self.choices)} choices: "
                                  f"{self.question[:60]!r}")


@dataclass
class MCResult:
    """Accuracy with the per-question detail it came from.

    ``letter_probs[i]`` are the probabilities of question ``i``'s option letters renormalized over those
    letters; ``letter_mass[i]`` is their total (unnormalized) probability under the model: a steered model
    whose letter mass collapses has stopped answering in the expected format, not only answering wrongly.
    """

    accuracy: float
    n: int
    per_subject: dict[str, float]
    predictions: list[int]
    letter_probs: list[list[float]]
    letter_mass: list[float] = field(default_factory=list)

    @property
    def mean_letter_mass(self) -> float:
        return sum(self.letter_mass) / len(self.letter_mass) if self.letter_mass else float("nan")

    def summary(self) -> str:
        text = f"accuracy {self.accuracy:.3f} on {self.n} questions"
        if self.letter_mass:
            text += f" (mean letter probability mass {self.mean_letter_mass:.2f})"
        return text


# ---------------------------------------------------------------------------------------------- data


def _letter_index(value: Any, n_choices: int, where: str) -> int:
    letter = str(value).strip().upper()
    if len(letter) != 1 or letter not in LETTERS[:n_choices]:
        hint = " (MMLU CSV files have no header row)" if str(value).strip().lower() == "answer" else ""
        raise PersonavecError(f"{where}: answer {str(value)!r} is not one of the letters "
                              f"{', '.join(LETTERS[:n_choices])}{hint}")
    return LETTERS.index(letter)


def _subject_from_stem(stem: str) -> str:
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _read_csv(path: Path) -> list[MCQuestion]:
    subject = _subject_from_stem(path.stem)
    out: list[MCQuestion] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for i, row in enumerate(csv.reader(f, strict=True), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                where = f"{path.name} row {i}"
                if len(row) < 2 + MIN_CHOICES or len(row) > 2 + MAX_CHOICES:
                    raise PersonavecError(
                        f"{where}: expected the MMLU layout question,A,B,C,D,answer (no header), got {len(row)} "
                        f"fields")
                question, choices, answer = row[0], row[1:-1], row[-1]
                idx = _letter_index(answer, len(choices), where)
                if not question.strip():
                    raise PersonavecError(f"{where}: the question is empty")
                out.append(MCQuestion(question=question, choices=choices, answer=idx, subject=subject))
    except csv.Error as e:
        raise PersonavecError(f"{path}: malformed CSV ({e})") from None
    except UnicodeDecodeError:
        raise PersonavecError(f"{path}: not a UTF-8 text file") from None
    if not out:
        raise PersonavecError(f"{path}: no questions in the file")
    return out


def _parquet_answer(value: Any, n_choices: int, where: str) -> int:
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            value = int(text)
        else:
            return _letter_index(text, n_choices, where)
    try:
        idx = int(value)
    except (TypeError, ValueError):
        raise PersonavecError(f"{where}: answer {value!r} is neither an index nor a letter") from None
    if idx != value or not 0 <= idx < n_choices:
        raise PersonavecError(f"{where}: answer index {value!r} out of range for {n_choices} choices")
    return idx


def _read_parquet(path: Path) -> list[MCQuestion]:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise PersonavecError(f"{path}: cannot read as Parquet ({str(e).splitlines()[0][:160]})") from None
    missing = [c for c in ("question", "choices", "answer") if c not in df.columns]
    if missing:
        found = ", ".join(map(str, df.columns))
        raise PersonavecError(f"{path}: missing column(s) {', '.join(missing)}; expected question, choices (a "
                              f"list), answer (index or letter), optional subject; found {found}")
    has_subject = "subject" in df.columns
    out: list[MCQuestion] = []
    for i, row in enumerate(df.itertuples(index=False), start=1):
        where = f"{path.name} row {i}"
        choices = row.choices
        if isinstance(choices, str) or not hasattr(choices, "__len__"):
            raise PersonavecError(f"{where}: 'choices' must be a list of option texts, got {type(choices).__name__}")
        choices = [str(c) for c in choices]
        if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
            raise PersonavecError(f"{where}: {len(choices)} choices; a question needs {MIN_CHOICES} to {MAX_CHOICES}")
        question = row.question
        if not isinstance(question, str) or not question.strip():
            raise PersonavecError(f"{where}: the question is empty or not text")
        subject = row.subject if has_subject else ""
        subject = "" if subject is None or (isinstance(subject, float) and math.isnan(subject)) else str(subject)
        out.append(MCQuestion(question=question, choices=choices,
                              answer=_parquet_answer(row.answer, len(choices), where), subject=subject))
    if not out:
        raise PersonavecError(f"{path}: no questions in the file")
    return out


def _read_file(path: Path) -> list[MCQuestion]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path)
    raise PersonavecError(f"{path}: unsupported file type {suffix or '(none)'!r}; give an MMLU .csv or .parquet "
                          "file, or a directory of them")


def read_mmlu(path: str | Path) -> list[MCQuestion]:
    """Read MMLU-format questions from a file or a directory.

    * ``.csv``: the original MMLU per-subject layout — no header, columns question, A, B, C, D, answer letter
      (2 to 10 option columns are accepted); the subject is the file name without ``.csv`` and without a
      trailing ``_test``/``_dev``/``_val``;
    * ``.parquet``: the Hugging Face ``cais/mmlu`` layout — columns ``question``, ``choices`` (a list),
      ``answer`` (an index, or a letter), optional ``subject``;
    * a directory: every ``.csv`` and ``.parquet`` file directly inside it, in name order (not recursive,
      so that the ``test``/``dev``/``val`` folders of the original release are not mixed).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir()
                       if f.is_file() and f.suffix.lower() in (".csv", *PARQUET_SUFFIXES))
        if not files:
            raise PersonavecError(f"{p}: no .csv or .parquet files in this directory (subdirectories are not "
                                  "searched; point at e.g. data/test)")
        return [q for f in files for q in _read_file(f)]
    if not p.is_file():
        raise PersonavecError(f"{p}: no such file or directory")
    return _read_file(p)


def builtin_mc() -> list[MCQuestion]:
    """The shipped set: 40 easy four-option questions (arithmetic, science, geography, language, everyday)."""
    res = resources.files("personavec") / "data" / "mc" / "general.csv"
    with resources.as_file(res) as p:
        return _read_csv(Path(p))


# ---------------------------------------------------------------------------------------------- scoring


def format_mc(q: MCQuestion) -> str:
    """The user message for one question: the question, its lettered options, and how to reply."""
    letters = LETTERS[: len(q.choices)]
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, q.choices))
    listed = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    return (f"{q.question.strip()}\n\n{options}\n\n"
            f"Reply with only the letter ({listed}) of the correct option.")


def mc_prompt(lm: LoadedModel, q: MCQuestion, system: str | None = None,
              assistant_prefix: str = ANSWER_PREFIX) -> str:
    """The full scored text: the chat-templated question followed by the assistant prefix."""
    return lm.format_chat(format_mc(q), system=system, assistant=assistant_prefix)


_LETTER_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SPACE_MARKERS = ("", "Ġ", "▁")  # raw piece, byte-level BPE space, SentencePiece space


def letter_token_ids(tokenizer: Any, n: int = MAX_CHOICES) -> list[list[int]]:
    """For each of the first ``n`` letters, the single-token spellings of it that the vocabulary has.

    Candidates are the encodings of ``"A"`` and ``" A"`` that are exactly one token, plus the vocabulary
    entries ``A``, ``ĠA`` and ``▁A`` (the space markers of byte-level BPE and SentencePiece). Computed once
    per tokenizer object.
    """
    try:
        cached = _LETTER_IDS.get(tokenizer)
    except TypeError:  # not weak-referenceable: compute every time
        cached = None
    if cached is None:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        cached = []
        for letter in LETTERS:
            ids: set[int] = set()
            for text in (letter, " " + letter):
                enc = tokenizer.encode(text, add_special_tokens=False)
                if len(enc) == 1 and tokenizer.decode(enc).strip() == letter:
                    ids.add(int(enc[0]))
            for marker in _SPACE_MARKERS:
                if marker + letter in vocab:
                    ids.add(int(vocab[marker + letter]))
            cached.append(sorted(ids))
        with contextlib.suppress(TypeError):  # not weak-referenceable
            _LETTER_IDS[tokenizer] = cached
    out = cached[:n]
    for letter, ids in zip(LETTERS, out):
        if not ids:
            raise PersonavecError(f"the tokenizer has no single token for the option letter {letter!r}; "
                                  "letter scoring cannot be used with it")
    flat = [i for ids in out for i in ids]
    if len(flat) != len(set(flat)):
        raise PersonavecError("the tokenizer maps two option letters to the same token")
    return out


@torch.no_grad()
def letter_scores(lm: LoadedModel, questions: Sequence[MCQuestion], batch_size: int = 16, progress: bool = False,
                  system: str | None = None,
                  assistant_prefix: str = ANSWER_PREFIX) -> tuple[list[list[float]], list[float]]:
    """Per question: the option letters' probabilities renormalized over the letters, and their total mass.

    One forward pass per batch, left-padded with an attention mask and ``position_ids = cumsum(mask) − 1``, so
    results do not depend on the batch size or on which questions share a batch.
    """
    if batch_size < 1:
        raise PersonavecError("batch size must be at least 1")
    if not questions:
        return [], []
    from tqdm.auto import tqdm

    tok = lm.tokenizer
    n_max = max(len(q.choices) for q in questions)
    letter_ids = letter_token_ids(tok, n_max)
    encs = [tok(mc_prompt(lm, q, system, assistant_prefix), add_special_tokens=False)["input_ids"]
            for q in questions]
    order = sorted(range(len(encs)), key=lambda i: -len(encs[i]))
    pad = pad_token_id(tok)
    device = lm.device
    model = lm.model
    keep = last_logits_kwarg(model)
    probs: list[list[float]] = [[] for _ in questions]
    mass: list[float] = [0.0] * len(questions)
    bar = tqdm(total=len(questions), desc="mc", unit="question", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        T = max(len(encs[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            n = len(encs[i])
            ids[b, T - n:] = torch.tensor(encs[i], dtype=torch.long)
            attn[b, T - n:] = 1
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": attn.to(device),
                                  "position_ids": pos.to(device), "use_cache": False}
        if keep:
            kwargs[keep] = 1
        logits = model(**kwargs).logits[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        for b, i in enumerate(idx):
            k = len(questions[i].choices)
            per_letter = torch.stack([torch.logsumexp(logp[b, letter_ids[j]], dim=0) for j in range(k)])
            total = torch.logsumexp(per_letter, dim=0)
            probs[i] = torch.exp(per_letter - total).tolist()
            mass[i] = float(torch.exp(total))
        bar.update(len(idx))
    bar.close()
    return probs, mass


def summarize(questions: Sequence[MCQuestion], letter_probs: Sequence[Sequence[float]],
              letter_mass: Sequence[float] | None = None) -> MCResult:
    """Accuracy and per-subject accuracy from per-question letter probabilities (argmax; ties → first)."""
    if len(letter_probs) != len(questions):
        raise PersonavecError(f"{len(letter_probs)} score rows for {len(questions)} questions")
    preds: list[int] = []
    for q, p in zip(questions, letter_probs):
        if len(p) != len(q.choices):
            raise PersonavecError(f"{len(p)} letter probabilities for a question with {len(q.choices)} choices")
        preds.append(max(range(len(p)), key=lambda j, p=p: (p[j], -j)))
    hits = [int(p == q.answer) for p, q in zip(preds, questions)]
    by_subject: dict[str, list[int]] = {}
    for q, h in zip(questions, hits):
        by_subject.setdefault(q.subject, []).append(h)
    n = len(questions)
    return MCResult(accuracy=sum(hits) / n if n else float("nan"), n=n,
                    per_subject={s: sum(v) / len(v) for s, v in sorted(by_subject.items())},
                    predictions=preds, letter_probs=[list(map(float, p)) for p in letter_probs],
                    letter_mass=list(letter_mass) if letter_mass is not None else [])


def mc_accuracy(lm: LoadedModel, questions: Sequence[MCQuestion], batch_size: int = 16, progress: bool = False,
                system: str | None = None, assistant_prefix: str = ANSWER_PREFIX) -> MCResult:
    """Multiple-choice accuracy of ``lm`` by letter logprob scoring (no generation).

    Each question is chat-formatted (:func:`format_mc`, optional ``system`` prompt) and followed by
    ``assistant_prefix``; the option whose letter is most probable at the next token is the prediction.
    A letter's probability is summed over its single-token spellings (``"A"``, ``" A"``, …).

    Works inside :func:`personavec.steering.steer`: the scored position is the last prompt token, so edits
    with positions ``all``/``prompt`` (and ``response_and_last_prompt``) change the result, ``response``
    edits do not.
    """
    probs, mass = letter_scores(lm, questions, batch_size=batch_size, progress=progress, system=system,
                                assistant_prefix=assistant_prefix)
    return summarize(questions, probs, mass)
