"""The SAE corpus: what each kind of file gives, what is refused, and the default corpus sampled once."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from personavec.errors import PersonavecError
from personavec.model.chat import format_chat
from personavec.sae import corpus as corpus_mod
from personavec.sae.corpus import Document, read_corpus_files, run_documents, sampled_corpus, trait_chats


def test_txt_is_one_document_per_paragraph(tmp_path, tokenizer):
    p = tmp_path / "a.txt"
    p.write_text("First paragraph,\nstill first.\n\n\nSecond one.\n  \nThird.\n")
    docs = read_corpus_files([p], tokenizer)
    assert [d.prompt for d in docs] == ["First paragraph,\nstill first.", "Second one.", "Third."]
    assert all(d.answer == "" for d in docs)


def test_table_columns(tmp_path, tokenizer):
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    pd.DataFrame({"prompt": ["<|im_start|>user\nQ<|im_end|>\n"], "answer": ["A"]}).to_parquet(tmp_path / "p.parquet")
    pd.DataFrame({"question": ["Why?"], "system": ["Be brief."], "answer": ["Because."]}).to_csv(
        tmp_path / "q.csv", index=False)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "plain words"}) + "\n" + json.dumps({"text": ""}) + "\n")
    m, p, q, t = (read_corpus_files([tmp_path / n], tokenizer) for n in ("m.jsonl", "p.parquet", "q.csv", "t.jsonl"))
    templated = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert m == [Document(templated, "Hello.", "m.jsonl")]
    assert p == [Document("<|im_start|>user\nQ<|im_end|>\n", "A", "p.parquet")]
    assert q == [Document(format_chat(tokenizer, "Why?", system="Be brief."), "Because.", "q.csv")]
    assert t == [Document("plain words", "", "t.jsonl")]  # the empty text is no document


def test_refusals(tmp_path, tokenizer):
    (tmp_path / "x.jsonl").write_text(json.dumps({"score": 1, "label": "a"}) + "\n")
    with pytest.raises(PersonavecError, match=r"no text column.*messages, prompt, question, text.*score, label"):
        read_corpus_files([tmp_path / "x.jsonl"], tokenizer)
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(PersonavecError, match="unsupported type"):
        read_corpus_files([tmp_path / "x.docx"], tokenizer)
    with pytest.raises(PersonavecError, match="does not exist"):
        read_corpus_files([tmp_path / "none.txt"], tokenizer)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(PersonavecError, match="row 0"):
        read_corpus_files([tmp_path / "bad.jsonl"], tokenizer)


def test_trait_chats_are_the_pipelines_prompts():
    from personavec.run.artifacts import builtin, builtin_traits

    jobs = trait_chats()
    assert len(jobs) == len(builtin_traits()) * 40 * 3  # every question with no, an eliciting, a suppressing prompt
    for trait in builtin_traits():
        art = builtin(trait)
        mine = [j for j in jobs if j["trait"] == trait]
        questions = art.extraction_questions + art.evaluation_questions
        assert [j["question"] for j in mine] == [q for q in questions for _ in range(3)]
        for i, j in enumerate(mine):
            q = i // 3
            want = [None, art.system_prompts("pos")[q % 5], art.system_prompts("neg")[q % 5]][i % 3]
            assert j["system"] == want and j["side"] == ("none", "pos", "neg")[i % 3] and j["question_id"] == q


def test_sampled_corpus_is_written_once(tmp_path, lm, monkeypatch):
    few = trait_chats()[:4]
    monkeypatch.setattr(corpus_mod, "trait_chats", lambda: few)
    cfg = corpus_mod.SamplingConfig(n_samples=1, max_new_tokens=6, batch_size=4)
    docs = sampled_corpus(lm, tmp_path / "c", seed=1, sampling=cfg, progress=False)
    assert len(docs) == 4 and (tmp_path / "c" / "corpus.parquet").is_file()
    assert docs[0].prompt == lm.format_chat(few[0]["question"])
    assert docs[1].prompt == lm.format_chat(few[1]["question"], system=few[1]["system"])

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(corpus_mod, "run_sampling", no_sampling)
    assert sampled_corpus(lm, tmp_path / "c", seed=1, sampling=cfg, progress=False) == docs


def test_run_documents(tmp_path):
    pd.DataFrame({"prompt": ["p1", "p2"], "answer": ["a1", None], "question": ["q", "q"]}).to_parquet(
        tmp_path / "responses.parquet")
    assert run_documents(tmp_path) == [Document("p1", "a1", "run:responses.parquet"),
                                       Document("p2", "", "run:responses.parquet")]
    with pytest.raises(PersonavecError, match="finished run"):
        run_documents(tmp_path / "nothing")
