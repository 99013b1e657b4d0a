"""Capability check: MMLU readers, the shipped question set, letter scoring (batching-exact), steering."""

from __future__ import annotations

import csv
from collections import Counter

import pytest
import torch

from personavec.errors import PersonavecError
from personavec.model.edits import Edit, steer
from personavec.steering import capability
from personavec.steering.capability import (
    LETTERS,
    MCQuestion,
    builtin_mc,
    format_mc,
    letter_scores,
    letter_token_ids,
    mc_accuracy,
    read_mmlu,
    summarize,
)

QUESTIONS = [
    MCQuestion("What is 2 + 2?", ["3", "4", "5", "6"], 1, "math"),
    MCQuestion("Which is a colour?", ["red", "dog"], 0, "words"),
    MCQuestion("How should I treat people who are weaker than me, and why would that matter at all?",
               ["kindly", "cruelly", "with scheming", "not at all", "with patience"], 4, "ethics"),
    MCQuestion("Pick the fox.", ["cat", "fox", "owl"], 1, "words"),
    MCQuestion("The quick brown fox jumps over the lazy dog. What jumps?", ["dog", "cat", "fox", "cow"], 2, "words"),
]


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


# ------------------------------------------------------------------------------------------ questions


def test_question_validation():
    with pytest.raises(PersonavecError, match="2 to 10 choices"):
        MCQuestion("q", ["only one"], 0)
    with pytest.raises(PersonavecError, match="out of range"):
        MCQuestion("q", ["a", "b"], 2)
    with pytest.raises(PersonavecError, match="integer index"):
        MCQuestion("q", ["a", "b"], "A")  # type: ignore[arg-type]


def test_format_mc_lists_lettered_options():
    text = format_mc(QUESTIONS[0])
    assert text.startswith("What is 2 + 2?")
    for letter, choice in zip("ABCD", QUESTIONS[0].choices):
        assert f"\n{letter}. {choice}" in text
    assert "(A, B, C or D)" in text
    assert "(A or B)" in format_mc(QUESTIONS[1])


def test_builtin_mc_has_40_balanced_questions():
    qs = builtin_mc()
    assert len(qs) == 40
    assert all(len(q.choices) == 4 and q.question.strip() and all(c.strip() for c in q.choices) for q in qs)
    assert all(q.subject == "general" for q in qs)
    counts = Counter(q.answer for q in qs)
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) >= 8
    assert len({q.question for q in qs}) == 40


# ------------------------------------------------------------------------------------------ read_mmlu


def test_read_mmlu_csv(tmp_path):
    p = tmp_path / "high_school_physics_test.csv"
    _write_csv(p, [["What falls, when dropped?", "a stone, usually", "nothing", "air", "light", "A"],
                   ["Multi-line\nquestion?", "1", "2", "3", "4", " d "],
                   []])
    qs = read_mmlu(p)
    assert [q.answer for q in qs] == [0, 3]
    assert qs[0].choices == ["a stone, usually", "nothing", "air", "light"]
    assert qs[1].question == "Multi-line\nquestion?"
    assert {q.subject for q in qs} == {"high_school_physics"}
    _write_csv(tmp_path / "astronomy_dev.csv", [["q?", "x", "y", "B"]])  # two options are fine too
    assert read_mmlu(tmp_path / "astronomy_dev.csv")[0].subject == "astronomy"
    _write_csv(tmp_path / "anatomy.csv", [["q?", "x", "y", "z", "w", "C"]])
    assert read_mmlu(str(tmp_path / "anatomy.csv"))[0].subject == "anatomy"


def test_read_mmlu_directory(tmp_path):
    _write_csv(tmp_path / "b_test.csv", [["q1?", "1", "2", "3", "4", "B"]])
    _write_csv(tmp_path / "a_test.csv", [["q2?", "1", "2", "3", "4", "C"], ["q3?", "1", "2", "3", "4", "D"]])
    (tmp_path / "notes.txt").write_text("ignored")
    sub = tmp_path / "dev"
    sub.mkdir()
    _write_csv(sub / "c_dev.csv", [["not read", "1", "2", "3", "4", "A"]])
    qs = read_mmlu(tmp_path)
    assert [(q.subject, q.question, q.answer) for q in qs] == [("a", "q2?", 2), ("a", "q3?", 3), ("b", "q1?", 1)]


def test_read_mmlu_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    df = pd.DataFrame({"question": ["q1?", "q2?", "q3?"],
                       "choices": [["a", "b", "c", "d"], ["x", "y"], ["1", "2", "3"]],
                       "answer": [3, 0, 1],
                       "subject": ["anatomy", "anatomy", "virology"]})
    p = tmp_path / "test-00000-of-00001.parquet"
    df.to_parquet(p)
    qs = read_mmlu(p)
    assert [(q.question, q.choices, q.answer, q.subject) for q in qs] == [
        ("q1?", ["a", "b", "c", "d"], 3, "anatomy"), ("q2?", ["x", "y"], 0, "anatomy"),
        ("q3?", ["1", "2", "3"], 1, "virology")]
    # letters as answers, no subject column
    df2 = pd.DataFrame({"question": ["q?"], "choices": [["a", "b", "c"]], "answer": ["C"]})
    df2.to_parquet(tmp_path / "letters.parquet")
    q = read_mmlu(tmp_path / "letters.parquet")[0]
    assert (q.answer, q.subject) == (2, "")
    # a directory mixing both formats
    _write_csv(tmp_path / "zoology_test.csv", [["q?", "1", "2", "3", "4", "A"]])
    assert len(read_mmlu(tmp_path)) == 5


@pytest.mark.parametrize("rows, pattern", [
    ([["question", "A", "B", "C", "D", "answer"]], "no header row"),
    ([["q?", "1", "2", "3", "4", "E"]], r"row 1: answer 'E' is not one of the letters A, B, C, D"),
    ([["q?", "1", "2", "3", "4", "A"], ["q?", "1", "2", "3", "4", "AB"]], "row 2: answer 'AB'"),
    ([["q?", "A"]], "expected the MMLU layout question,A,B,C,D,answer"),
    ([["q?", *[str(i) for i in range(11)], "A"]], "got 13 fields"),
    ([[" ", "1", "2", "3", "4", "A"]], "the question is empty"),
    ([], "no questions"),
])
def test_read_mmlu_csv_errors(tmp_path, rows, pattern):
    p = tmp_path / "bad_test.csv"
    _write_csv(p, rows)
    with pytest.raises(PersonavecError, match=pattern) as e:
        read_mmlu(p)
    assert "\n" not in str(e.value)


def test_read_mmlu_file_errors(tmp_path):
    with pytest.raises(PersonavecError, match="no such file or directory"):
        read_mmlu(tmp_path / "missing.csv")
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(PersonavecError, match=r"unsupported file type '\.json'"):
        read_mmlu(tmp_path / "data.json")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PersonavecError, match="cannot read as Parquet"):
        read_mmlu(tmp_path / "broken.parquet")
    (tmp_path / "latin1_test.csv").write_bytes("caf\xe9?,1,2,3,4,A\n".encode("latin-1"))
    with pytest.raises(PersonavecError, match="not a UTF-8 text file"):
        read_mmlu(tmp_path / "latin1_test.csv")
    (tmp_path / "quote_test.csv").write_text('"unterminated,1,2,3,4,A\n')
    with pytest.raises(PersonavecError, match="malformed CSV"):
        read_mmlu(tmp_path / "quote_test.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PersonavecError, match=r"no \.csv or \.parquet files"):
        read_mmlu(empty)


def test_read_mmlu_parquet_errors(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    cases = [
        (pd.DataFrame({"question": ["q"], "answer": [0]}), "missing column.s. choices"),
        (pd.DataFrame({"question": ["q"], "choices": [["a", "b"]], "answer": [2]}), "out of range for 2 choices"),
        (pd.DataFrame({"question": ["q"], "choices": [["a", "b"]], "answer": ["Z"]}), "answer 'Z' is not one of"),
        (pd.DataFrame({"question": ["q"], "choices": [["a"]], "answer": [0]}), "1 choices"),
        (pd.DataFrame({"question": ["q"], "choices": ["a,b"], "answer": [0]}), "must be a list"),
    ]
    for i, (df, pattern) in enumerate(cases):
        p = tmp_path / f"bad{i}.parquet"
        df.to_parquet(p)
        with pytest.raises(PersonavecError, match=pattern) as e:
            read_mmlu(p)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ scoring


def test_summarize_accuracy_math():
    qs = [MCQuestion("q1", ["a", "b", "c", "d"], 0, "x"), MCQuestion("q2", ["a", "b"], 1, "x"),
          MCQuestion("q3", ["a", "b", "c"], 2, "y"), MCQuestion("q4", ["a", "b", "c", "d"], 3, "y")]
    probs = [[0.7, 0.1, 0.1, 0.1], [0.6, 0.4], [0.2, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]]  # last: tie → A
    r = summarize(qs, probs, [0.9, 0.8, 0.5, 0.2])
    assert r.predictions == [0, 0, 2, 0]
    assert r.accuracy == pytest.approx(0.5)
    assert r.n == 4
    assert r.per_subject == {"x": 0.5, "y": 0.5}
    assert r.mean_letter_mass == pytest.approx(0.6)
    assert "accuracy 0.500 on 4 questions" in r.summary()
    with pytest.raises(PersonavecError, match="3 letter probabilities"):
        summarize(qs[:1], [[0.5, 0.3, 0.2]])


def test_mc_accuracy_uses_scores(lm, monkeypatch):
    qs = builtin_mc()[:8]

    def fake(lm_, questions, **kw):  # predict the right answer for even rows, option 0 / 1 otherwise
        out = []
        for i, q in enumerate(questions):
            p = [0.0] * len(q.choices)
            p[q.answer if i % 2 == 0 else (1 if q.answer == 0 else 0)] = 1.0
            out.append(p)
        return out, [1.0] * len(questions)

    monkeypatch.setattr(capability, "letter_scores", fake)
    r = mc_accuracy(lm, qs)
    assert r.accuracy == pytest.approx(0.5)
    assert r.per_subject == {"general": 0.5}
    assert [p == q.answer for p, q in zip(r.predictions, qs)] == [True, False] * 4


def test_letter_token_ids(tokenizer):
    ids = letter_token_ids(tokenizer, 4)
    assert len(ids) == 4
    for letter, group in zip(LETTERS, ids):
        assert group and all(tokenizer.decode([i]).strip() == letter for i in group)
    assert letter_token_ids(tokenizer, 4) == ids  # cached per tokenizer


def test_letter_token_ids_merges_spellings():
    """A tokenizer with distinct "A" and " A" tokens: both spellings count for the letter."""
    from conftest import make_tokenizer

    tok = make_tokenizer(400)
    tok.add_tokens([" A", " B"])
    ids = letter_token_ids(tok, 2)
    assert ids[0] == sorted({tok.encode("A", add_special_tokens=False)[0], tok.convert_tokens_to_ids(" A")})
    assert len(ids[0]) == 2 and len(ids[1]) == 2


def test_letter_scores_are_distributions(lm):
    probs, mass = letter_scores(lm, QUESTIONS, batch_size=2)
    assert [len(p) for p in probs] == [len(q.choices) for q in QUESTIONS]
    for p, m in zip(probs, mass):
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
        assert all(x >= 0 for x in p)
        assert 0 < m <= 1


@pytest.mark.parametrize("batch_size", [2, 3, 16])
def test_batched_equals_unbatched(lm, batch_size):
    qs = QUESTIONS + builtin_mc()[:4]
    one = [letter_scores(lm, [q], batch_size=1)[0][0] for q in qs]
    many, _ = letter_scores(lm, qs, batch_size=batch_size)
    for a, b in zip(one, many):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-4)


def test_full_logits_path_matches_last_only(lm, monkeypatch):
    ref, _ = letter_scores(lm, QUESTIONS, batch_size=3)
    monkeypatch.setattr(capability, "last_logits_kwarg", lambda model: None)
    full, _ = letter_scores(lm, QUESTIONS, batch_size=3)
    torch.testing.assert_close(torch.tensor([x for p in full for x in p]),
                               torch.tensor([x for p in ref for x in p]), atol=1e-6, rtol=1e-5)


def test_scoring_uses_chat_format_and_prefix(lm, monkeypatch):
    seen = []
    orig = lm.format_chat

    def spy(user, system=None, assistant=None):
        seen.append((user, system, assistant))
        return orig(user, system=system, assistant=assistant)

    monkeypatch.setattr(lm, "format_chat", spy)
    letter_scores(lm, QUESTIONS[:1], system="Be brief.")
    assert seen == [(format_mc(QUESTIONS[0]), "Be brief.", "Answer:")]


def test_bad_batch_size_and_empty(lm):
    with pytest.raises(PersonavecError, match="batch size"):
        letter_scores(lm, QUESTIONS, batch_size=0)
    assert letter_scores(lm, []) == ([], [])


# ------------------------------------------------------------------------------------------ steering


def _p_b(lm, qs, **kw):
    probs, _ = letter_scores(lm, qs, batch_size=4)
    return torch.tensor([p[1] for p in probs])


def test_steering_toward_letter_b_raises_its_probability(lm):
    qs = QUESTIONS[:2] + builtin_mc()[:4]
    n_layers = lm.n_layers
    b_ids = letter_token_ids(lm.tokenizer, 2)[1]
    direction = lm.model.lm_head.weight[b_ids[0]].detach().clone()
    base = _p_b(lm, qs)
    with steer(lm, Edit(layer=n_layers, direction=direction, coef=50.0, positions="all")):
        steered = _p_b(lm, qs)
        r = mc_accuracy(lm, qs)
    assert bool((steered > base).all())
    assert bool((steered > 0.95).all())
    assert r.predictions == [1] * len(qs)
    # hooks are gone after the context
    torch.testing.assert_close(_p_b(lm, qs), base)


def test_steering_positions_at_the_scored_token(lm):
    qs = QUESTIONS[:3]
    direction = lm.model.lm_head.weight[letter_token_ids(lm.tokenizer, 2)[1][0]].detach().clone()
    base = _p_b(lm, qs)
    edit = {pos: Edit(layer=lm.n_layers, direction=direction, coef=50.0, positions=pos)
            for pos in ("all", "prompt", "response", "response_and_last_prompt")}
    with steer(lm, edit["response"]):
        torch.testing.assert_close(_p_b(lm, qs), base)  # no generated tokens: nothing to edit
    with steer(lm, edit["all"]):
        p_all = _p_b(lm, qs)
    with steer(lm, edit["prompt"]):
        torch.testing.assert_close(_p_b(lm, qs), p_all)  # the whole scored pass is prompt
    with steer(lm, edit["response_and_last_prompt"]):
        p_last = _p_b(lm, qs)
    assert bool((p_all > base + 0.3).all())
    assert bool((p_last > base + 0.3).all())
