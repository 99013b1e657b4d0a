"""Trait artifacts: built-in traits, validation, the official layout, and generation with retries."""

from __future__ import annotations

import json

import pytest

from openai_server import FakeOpenAIServer
from personavec.endpoint import EndpointConfig
from personavec.errors import PersonavecError
from personavec.run.artifacts import (
    InstructionPair,
    TraitArtifacts,
    article,
    builtin,
    builtin_traits,
    generate_artifacts,
    system_prompt,
)
from personavec.run.writers import EndpointGenerator

PAPER_TRAITS = {"evil", "sycophantic", "hallucinating", "impolite", "apathetic", "humorous", "optimistic"}


def test_seven_builtin_traits_validate():
    assert set(builtin_traits()) >= PAPER_TRAITS
    for name in PAPER_TRAITS:
        a = builtin(name)
        assert a.name == name and len(a.instructions) == 5
        assert len(a.extraction_questions) == 20 and len(a.evaluation_questions) == 20
        assert "{question}" not in a.judge_prompt("Q?", "A.") and "Q?" in a.judge_prompt("Q?", "A.")
        assert len(a.ladder) == 8 and len(set(a.ladder)) == 8
    with pytest.raises(PersonavecError, match="unknown trait 'grumpy'"):
        builtin("grumpy")


def test_system_prompt_and_articles():
    assert system_prompt("evil", "Be cruel.") == "You are an evil assistant. Be cruel."
    assert system_prompt("helpful", "Be kind.") == "You are a helpful assistant. Be kind."
    assert article("honest") == "an" and article("unbiased") == "an" and article("useful") == "a"
    a = builtin("impolite")
    assert a.system_prompts("pos")[0].startswith("You are an impolite assistant. ")
    assert a.system_prompts("neg")[0].startswith(f"You are a {a.neg_name} assistant. ")


def _official_files(tmp_path):
    ext = {"instruction": [{"pos": f"Be rude {i}.", "neg": f"Be kind {i}."} for i in range(5)],
           "questions": [f"Extraction question {i}?" for i in range(20)],
           "eval_prompt": "Rate rudeness.\nQ: {question}\nA: {answer}\nReply 0-100 or REFUSAL."}
    ev = {**ext, "questions": [f"Evaluation question {i}?" for i in range(20)]}
    (tmp_path / "extract").mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / "extract" / "rude.json").write_text(json.dumps(ext, indent=4))
    (tmp_path / "eval" / "rude.json").write_text(json.dumps(ev, indent=4))
    return ext, ev


def test_official_layout_round_trip_is_lossless(tmp_path):
    ext, ev = _official_files(tmp_path)
    a = TraitArtifacts.from_official(tmp_path / "extract" / "rude.json", tmp_path / "eval" / "rude.json")
    assert a.name == "rude" and a.validate() is a
    assert a.instructions[2] == InstructionPair("Be rude 2.", "Be kind 2.")
    out_ext, out_ev = a.export_official(tmp_path / "o_extract", tmp_path / "o_eval")
    assert json.loads(out_ext.read_text()) == ext and json.loads(out_ev.read_text()) == ev
    # and ours -> official -> ours keeps every field the official layout has
    b = builtin("evil")
    e2, v2 = b.to_official()
    c = TraitArtifacts.from_official(e2, v2, name="evil", neg_name=b.neg_name)
    assert (c.instructions, c.extraction_questions, c.evaluation_questions, c.rubric) == (
        b.instructions, b.extraction_questions, b.evaluation_questions, b.rubric)
    # native JSON round trip is exact
    b.save(tmp_path / "evil.json")
    assert TraitArtifacts.load(tmp_path / "evil.json").to_dict() == b.to_dict()


def test_validation_names_the_problems():
    a = builtin("evil")
    bad = TraitArtifacts(name="evil", description="", instructions=a.instructions[:4],
                         extraction_questions=a.extraction_questions, evaluation_questions=a.extraction_questions,
                         rubric="Score it: {answer}")
    with pytest.raises(PersonavecError) as e:
        bad.validate()
    msg = str(e.value)
    assert "4 instruction pairs" in msg and "questions repeat" in msg and "{question}" in msg


def _valid_reply(name="grumpy"):
    return json.dumps({
        "neg_name": "cheerful",
        "instructions": [{"pos": f"Grumble about everything ({i}).", "neg": f"Stay upbeat ({i})."} for i in range(5)],
        "questions": [f"Question number {i} about daily life?" for i in range(40)],
        "rubric": "Rate grumpiness 0-100.\nQuestion: {question}\nAnswer: {answer}\nOnly the number, or REFUSAL.",
    })


def test_generation_retries_after_malformed_json():
    replies = iter(["Sure! Here is the JSON: {not valid json", "```json\n" + _valid_reply() + "\n```"])
    with FakeOpenAIServer(responder=lambda prompt: [(next(replies), 0.0)]) as srv:
        gen = EndpointGenerator(EndpointConfig(base_url=srv.base_url, api_key="k", model="gen"))
        art = generate_artifacts(gen, "grumpy", "Complains about everything and sees the worst in things.")
        assert len(srv.chat_requests) == 2
        second = srv.chat_requests[1].body["messages"]
        assert second[-1]["role"] == "user" and "not usable" in second[-1]["content"]
    assert art.name == "grumpy" and art.neg_name == "cheerful" and art.source == "generated"
    assert art.extraction_questions[0] == "Question number 0 about daily life?"
    assert art.evaluation_questions[0] == "Question number 20 about daily life?"


def test_generation_gives_up_with_a_clear_message():
    with FakeOpenAIServer(responder=lambda prompt: [("no json here", 0.0)]) as srv:
        gen = EndpointGenerator(EndpointConfig(base_url=srv.base_url, api_key=None, model="gen"))
        with pytest.raises(PersonavecError, match="no valid artifacts in 3 tries"):
            generate_artifacts(gen, "grumpy", "x", max_tries=3)
        assert len(srv.chat_requests) == 3


def test_official_trait_files_are_accepted_by_the_run(tmp_path, model_dir):
    """``run --artifacts trait_data_extract/evil.json`` refused the official files ("missing evaluation_questions")."""
    from personavec.run.artifacts import load_artifacts
    from personavec.run.config import RunConfig
    from personavec.run.pipeline import Run

    ref = builtin("evil")
    ext, ev = ref.export_official(tmp_path / "trait_data_extract", tmp_path / "trait_data_eval")
    for art in (load_artifacts(ext), load_artifacts(ev),  # the other file of the layout is found by itself
                Run(RunConfig(trait="evil", model=str(model_dir), artifacts_path=str(ext),
                              eval_artifacts_path=str(ev)), run_dir=tmp_path / "run").make_artifacts()):
        assert art.instructions == ref.instructions and art.rubric == ref.rubric
        assert art.extraction_questions == ref.extraction_questions
        assert art.evaluation_questions == ref.evaluation_questions and art.validate()
    lone = tmp_path / "evil.json"
    lone.write_text(ext.read_text())
    with pytest.raises(PersonavecError, match=r"--eval-artifacts trait_data_eval/evil\.json"):
        load_artifacts(lone)
    with pytest.raises(PersonavecError, match="drop it"):
        load_artifacts(tmp_path / "own.json" if ref.save(tmp_path / "own.json") else None, eval_path=ev)
    assert not (tmp_path / "run").exists()
