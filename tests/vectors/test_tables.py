"""Response tables: formats, the official CSV layout, the paired filter, and extraction from them."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from conftest import official_frames
from personavec.errors import PersonavecError
from personavec.files import read_table, write_table
from personavec.vectors.extraction import extract_vector
from personavec.vectors.tables import FilterConfig, paired_filter, prompts_and_answers


def test_official_csv_layout_works_as_is(tmp_path, lm, tokenizer):
    pos, neg = official_frames(tokenizer, [90, 80, 30, 95], [5, 10, 2, 70])
    pos.to_csv(tmp_path / "evil_pos_instruct.csv", index=False)
    neg.to_csv(tmp_path / "evil_neg_instruct.csv", index=False)
    vec = extract_vector(lm, tmp_path / "evil_pos_instruct.csv", tmp_path / "evil_neg_instruct.csv", trait="evil")
    # row 2 fails pos >= 50, row 3 fails neg < 50
    assert vec.counts["kept"] == 2 and vec.counts["rows"] == 4
    assert vec.filter["applied"] is True
    direct = extract_vector(lm, pos.iloc[[0, 1]], neg.iloc[[0, 1]], trait="evil", apply_filter=False)
    for p in vec.tensors:
        torch.testing.assert_close(vec.tensors[p], direct.tensors[p])


def test_filter_thresholds_and_missing_scores():
    pos = pd.DataFrame({"answer": ["a", "b", "c", "d"], "evil": [50, 49.9, None, 100],
                        "coherence": [50, 90, 90, 49]})
    neg = pd.DataFrame({"answer": ["a", "b", "c", "d"], "evil": [49.9, 0, 0, 0], "coherence": [50, 90, 90, 90]})
    r = paired_filter(pos, neg, "evil")
    assert r.keep == [True, False, False, False]
    r2 = paired_filter(pos, neg, "evil", FilterConfig(pos_min=40, neg_max=50, coherence_min=40))
    assert r2.keep == [True, True, False, True]
    assert paired_filter(pos, neg, "evil", enabled=False).keep == [True] * 4


def test_zero_pairs_names_the_thresholds(lm, tokenizer):
    pos, neg = official_frames(tokenizer, [10, 10, 10, 10], [0, 0, 0, 0])
    with pytest.raises(PersonavecError, match=r"only 0 of 4 pairs.*pos trait >= 50"):
        extract_vector(lm, pos, neg, trait="evil")


def test_formats_round_trip(tmp_path, tokenizer):
    pos, _ = official_frames(tokenizer, [90] * 4, [0] * 4)
    for suffix in ("csv", "jsonl", "parquet"):
        path = write_table(pos, tmp_path / f"t.{suffix}")
        back = read_table(path)
        assert back["answer"].tolist() == pos["answer"].tolist()
        assert back["prompt"].tolist() == pos["prompt"].tolist()
        assert back["evil"].astype(float).tolist() == pos["evil"].astype(float).tolist()


def test_question_and_system_columns_are_templated(tokenizer):
    df = pd.DataFrame({"question": ["Hi?"], "system": ["You are evil."], "answer": ["No."]})
    prompts, answers = prompts_and_answers(df, tokenizer)
    assert prompts[0] == "<|im_start|>system\nYou are evil.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n" \
                         "<|im_start|>assistant\n"
    assert answers == ["No."]


def test_malformed_tables_give_clear_errors(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n{not json\n")
    with pytest.raises(PersonavecError, match=r"bad.jsonl:2: malformed JSON"):
        read_table(bad)
    (tmp_path / "arr.jsonl").write_text("[1, 2]\n")
    with pytest.raises(PersonavecError, match="expected a JSON object"):
        read_table(tmp_path / "arr.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(PersonavecError, match="unsupported table type"):
        read_table(tmp_path / "x.txt")
    with pytest.raises(PersonavecError, match="does not exist"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(PersonavecError, match="no 'answer' column"):
        prompts_and_answers(pd.DataFrame({"prompt": ["p"]}))
    with pytest.raises(PersonavecError, match="'prompt' column"):
        prompts_and_answers(pd.DataFrame({"text": ["p"], "answer": ["a"]}))
    with pytest.raises(PersonavecError, match="empty in 1 rows"):
        prompts_and_answers(pd.DataFrame({"prompt": ["p", None], "answer": ["a", "b"]}))
    pos = pd.DataFrame({"answer": ["a"], "evil": [90], "coherence": [90]})
    with pytest.raises(PersonavecError, match="one side only"):
        paired_filter(pos, pd.DataFrame({"answer": ["a"]}), "evil")
    with pytest.raises(PersonavecError, match="one to one"):
        paired_filter(pos, pd.DataFrame({"answer": ["a", "b"]}), "evil")


def test_model_without_chat_template_is_a_clear_error(tokenizer):
    import copy

    from personavec.model.loading import format_chat

    t = copy.deepcopy(tokenizer)
    t.chat_template = None
    with pytest.raises(PersonavecError, match="no chat template"):
        format_chat(t, "hi")


def test_answers_that_are_not_text_or_only_whitespace_are_refused(lm, tokenizer, tmp_path):
    """Whitespace-only answers were extracted from; list- and bytes-valued cells became the text "['a', 'b']" and
    "b'...'" (the answers nobody wrote)."""
    pos, neg = official_frames(tokenizer, [90, 80, 70, 95], [5, 10, 2, 7])
    blank = pos.copy()
    blank.loc[1, "answer"] = "  \n\t "
    with pytest.raises(PersonavecError, match=r"1 answers are empty or only whitespace \(first at row 1\)"):
        extract_vector(lm, blank, neg, trait="evil", apply_filter=False)
    # with the scores and the filter the blank pair is dropped, as an empty one is
    assert extract_vector(lm, blank, neg, trait="evil").counts["kept"] == 3
    listed = pos.copy()
    listed["answer"] = listed["answer"].astype(object)
    listed.at[2, "answer"] = ["Crush", "them"]
    with pytest.raises(PersonavecError, match=r"'answer' holds 1 cells that are not text \(the first, at row 2, "
                                              r"is a list\)"):
        extract_vector(lm, listed, neg, trait="evil")
    raw = pos.assign(answer=[a.encode() for a in pos["answer"]])
    write_table(raw, tmp_path / "bytes.parquet")
    with pytest.raises(PersonavecError, match=r"bytes\.parquet: column 'answer' holds 4 cells that are not text .*"
                                              r"is a bytes"):
        extract_vector(lm, tmp_path / "bytes.parquet", neg, trait="evil")



def test_a_bad_cell_is_named_by_its_row_in_the_file_when_the_filter_dropped_rows_before_it(tokenizer):
    """The check runs on the pairs the filter keeps; the row it names is the file's, not the kept rows' count."""
    from personavec.vectors.extraction import select_pairs

    pos, neg = official_frames(tokenizer, [10, 80, 70, 95], [5, 10, 2, 7])  # pair 0 fails the filter
    listed = pos.assign(answer=pos["answer"].astype(object))
    listed.at[2, "answer"] = ["Crush", "them"]
    with pytest.raises(PersonavecError, match=r"the first, at row 2, is a list"):
        select_pairs(listed, neg, trait="evil")
    assert select_pairs(pos, neg, trait="evil").pos.index.tolist() == [0, 1, 2]  # the kept rows, renumbered

def test_pos_equal_to_neg_and_no_layers_are_refused(lm, tokenizer, tmp_path):
    """The same file (or the same contents) as pos and neg, or a reversed layer range, gave an all-zero vector."""
    pos, neg = official_frames(tokenizer, [90, 80, 70, 95], [5, 10, 2, 7])
    pos.to_csv(tmp_path / "pos.csv", index=False)
    with pytest.raises(PersonavecError, match="are the same file"):
        extract_vector(lm, tmp_path / "pos.csv", tmp_path / "pos.csv", trait="evil", apply_filter=False)
    pos.to_csv(tmp_path / "copy.csv", index=False)
    with pytest.raises(PersonavecError, match="hold the same prompts and answers"):
        extract_vector(lm, tmp_path / "pos.csv", tmp_path / "copy.csv", trait="evil", apply_filter=False)
    with pytest.raises(PersonavecError, match="hold the same prompts and answers"):  # scores differ, text does not
        extract_vector(lm, pos, pos.assign(evil=[1, 2, 3, 4]), trait="evil")
    with pytest.raises(PersonavecError, match="layers is empty"):
        extract_vector(lm, pos, neg, trait="evil", layers=list(range(12, 3)))
    vec = extract_vector(lm, pos, neg.assign(answer=list(pos["answer"])), trait="evil", layers=[1])
    assert float(vec.get(1).norm()) > 0  # same answers under other prompts: a real difference
