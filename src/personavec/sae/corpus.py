"""The text an SAE is trained on: the user's files, or text the toolkit makes itself, offline.

A corpus is a list of :class:`Document` s, each a chat-templated ``prompt`` and an ``answer`` (plain text is a
document whose prompt is the text and whose answer is empty); SAE training reads the residual stream at every
token of each document (prompt and answer).

Files (:func:`read_corpus_files`):

* ``.txt``: one document per paragraph (paragraphs are separated by blank lines; a file without blank lines is one
  document);
* ``.jsonl`` / ``.json`` (one object per line), ``.parquet``, ``.csv``: the first of these columns a file has is
  read: ``messages`` (a chat, chat-templated with the model's template; a last assistant turn is the answer),
  ``prompt`` (chat-formatted text, as the pipeline's tables hold it) with an optional ``answer``, ``question`` (a
  user turn, templated, with optional ``system`` and ``answer``), ``text`` (plain text). A file with none of them is
  refused in one line.

The default corpus (:func:`sampled_corpus`): the model's own answers, sampled through the engine, to every built-in
trait's 40 questions, each asked three times — with no system prompt, with one of the trait's eliciting system
prompts and with the matching suppressing one (:func:`trait_chats`: 840 chats for the seven traits),
chat-templated exactly as the pipeline does. Sampling them is the largest part of a default training on 2 CPU cores
(about 6 minutes there, once). The answers are appended to ``DIR/corpus/answers.jsonl`` as they finish (a killed run
resumes) and written once to ``DIR/corpus/corpus.parquet``: a rerun reuses it. With a finished run's directory, its
answers (``responses.parquet``, else ``judged.parquet``) join the corpus.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from ..engine.sampling import SamplingConfig, run_sampling
from ..errors import PersonavecError
from ..files import fingerprint, read_table, write_table
from ..model.chat import conversation_pair, format_chat, missing
from ..model.loading import LoadedModel

#: the columns a table may carry its text in, in the order they are looked for
TEXT_COLUMNS = ("messages", "prompt", "question", "text")
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
#: the default corpus's three askings of every question: no system prompt, eliciting, suppressing
SIDES = ("none", "pos", "neg")
#: the default corpus's sampling: temperature 1, answers of at most 48 tokens (840 of them)
CORPUS_SAMPLING = SamplingConfig(n_samples=1, temperature=1.0, top_p=1.0, max_new_tokens=48, batch_size=96)


@dataclass(frozen=True)
class Document:
    """One text of the corpus: a chat-templated ``prompt`` and its ``answer`` ("" for plain text)."""

    prompt: str
    answer: str = ""
    source: str = ""


# --------------------------------------------------------------------------------------------- user files


def read_corpus_files(paths: Sequence[str | os.PathLike], tokenizer: Any) -> list[Document]:
    """The documents of the user's files (see the module docstring for what is read); an unreadable file, or one
    with no text column, is refused in one line."""
    docs: list[Document] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise PersonavecError(f"corpus file {path} does not exist (or is not a file)")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs += _text_documents(path)
        elif suffix in TABLE_SUFFIXES:
            docs += _table_documents(path, tokenizer)
        else:
            raise PersonavecError(f"corpus file {path}: unsupported type {suffix or '(no suffix)'}; use .txt, "
                                  f"{', '.join(TABLE_SUFFIXES)}")
    return docs


def _text_documents(path: Path) -> list[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PersonavecError(f"corpus file {path} is not UTF-8 text") from None
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text)]
    return [Document(p, "", path.name) for p in paragraphs if p]


def _table_documents(path: Path, tokenizer: Any) -> list[Document]:
    df = read_table(path)
    column = next((c for c in TEXT_COLUMNS if c in df.columns), None)
    if column is None:
        found = ", ".join(map(str, df.columns[:8])) or "none"
        raise PersonavecError(f"corpus file {path} has no text column: it needs one of {', '.join(TEXT_COLUMNS)} "
                              f"(columns found: {found})")
    docs: list[Document] = []
    for i, row in enumerate(df.to_dict("records")):
        try:
            doc = _row_document(row, column, tokenizer, path.name)
        except PersonavecError as e:
            raise PersonavecError(f"corpus file {path}, row {i}: {e}") from None
        if doc is not None:
            docs.append(doc)
    return docs


def _row_document(row: dict[str, Any], column: str, tokenizer: Any, source: str) -> Document | None:
    def text(name: str) -> str:
        value = row.get(name)
        return "" if missing(value) else str(value)

    if column in ("messages", "prompt"):
        if column == "messages" and missing(row.get("messages")):
            return None
        prompt, answer = conversation_pair({k: row.get(k) for k in ("messages", "prompt", "answer")}
                                           if column == "prompt" else {"messages": row["messages"]}, tokenizer)
        return Document(prompt, answer or "", source) if prompt else None
    if column == "question":
        if not text("question").strip():
            return None
        return Document(format_chat(tokenizer, text("question"), system=text("system") or None), text("answer"),
                        source)
    body = text("text").strip()
    return Document(body, "", source) if body else None


def run_documents(run_dir: str | os.PathLike) -> list[Document]:
    """A finished run's answers (``responses.parquet``, else ``judged.parquet``): prompt and answer of every row."""
    run_dir = Path(run_dir)
    for name in ("responses.parquet", "judged.parquet"):
        path = run_dir / name
        if path.is_file():
            df = pd.read_parquet(path, columns=["prompt", "answer"])
            return [Document(str(r.prompt), "" if missing(r.answer) else str(r.answer), f"run:{name}")
                    for r in df.itertuples() if not missing(r.prompt)]
    raise PersonavecError(f"{run_dir} holds no responses.parquet or judged.parquet: give a finished run's directory "
                          "(personavec run ...)")


def run_identity(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What a run's answers are, for the settings a training directory records."""
    run_dir = Path(run_dir)
    for name in ("responses.parquet", "judged.parquet"):
        if (run_dir / name).is_file():
            return fingerprint(run_dir / name)
    return {}


# --------------------------------------------------------------------------------------------- the default corpus


def trait_chats() -> list[dict[str, Any]]:
    """Every built-in trait's 40 questions, each three times: question ``q`` with no system prompt, with eliciting
    prompt ``q mod 5`` and with the matching suppressing one (the pipeline's ``You are a/an {name} assistant.
    {instruction}``): the default corpus's jobs."""
    base = resources.files("personavec") / "data" / "traits"
    jobs: list[dict[str, Any]] = []
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        art = json.loads(entry.read_text(encoding="utf-8"))
        pairs = art["instructions"]
        questions = list(art["extraction_questions"]) + list(art["evaluation_questions"])
        for q, question in enumerate(questions):
            pair = pairs[q % len(pairs)]
            systems = {"none": None, "pos": _system_prompt(art["name"], pair["pos"]),
                       "neg": _system_prompt(art.get("neg_name", "helpful"), pair["neg"])}
            jobs += [{"trait": art["name"], "question_id": q, "side": side, "system": systems[side],
                      "question": question} for side in SIDES]
    return jobs


def _system_prompt(name: str, instruction: str) -> str:
    """The pipeline's system prompt (``personavec.run.artifacts.system_prompt``; equal by test)."""
    w = name.strip().lower()
    if re.match(r"(hon|hour|heir)", w):
        a = "an"
    elif re.match(r"(uni|use|usu|uti|eu|one\b|once)", w):
        a = "a"
    else:
        a = "an" if w[:1] in "aeiou" else "a"
    return f"You are {a} {name} assistant. {instruction}".strip()


def sampled_corpus(lm: LoadedModel, directory: str | os.PathLike, seed: int = 0,
                   sampling: SamplingConfig = CORPUS_SAMPLING, progress: bool | str = "corpus") -> list[Document]:
    """The default corpus (see the module docstring), sampled once into ``directory`` (``answers.jsonl`` as they
    finish, then ``corpus.parquet``) and read back from there on later calls."""
    directory = Path(directory)
    table = directory / "corpus.parquet"
    if not table.is_file():
        jobs = [{**job, "prompt": lm.format_chat(job["question"], system=job["system"])} for job in trait_chats()]
        cfg = SamplingConfig(**{**sampling.to_dict(), "seed": seed})
        rows = run_sampling(lm, jobs, cfg, directory / "answers.jsonl", progress=progress)
        write_table(pd.DataFrame(rows)[["trait", "question_id", "side", "system", "question", "prompt", "answer",
                                        "n_tokens", "seed"]], table)
    df = pd.read_parquet(table, columns=["prompt", "answer"])
    return [Document(str(r.prompt), str(r.answer), "sampled") for r in df.itertuples()]
