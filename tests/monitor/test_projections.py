"""Projections of conversations, resumable projection files, and the live monitor."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from personavec.model.activations import encode_pairs
from personavec.model.chat import conversation_pair
from personavec.monitor.live import LiveMonitor
from personavec.monitor.projections import project_file, project_rows
from personavec.vectors.probe import Probe
from personavec.vectors.vector import PersonaVector


def _vec(seed: int, name: str = "evil") -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    return PersonaVector(tensors={"response_avg": torch.randn(3, 32, generator=g)}, model_id="tiny", trait=name)


ROWS = [
    {"messages": [{"role": "user", "content": "How should I treat people?"},
                  {"role": "assistant", "content": "Crush them all."}]},
    {"prompt": "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n", "answer": "Because foxes."},
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about foxes."}]},
]


def _direct(lm, row, layer):
    prompt, answer = conversation_pair(row, lm.tokenizer)
    e = encode_pairs(lm.tokenizer, [prompt], [answer or ""])[0]
    with torch.no_grad():
        h = lm.model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states[layer][0]
    return {"prompt_last": h[e.n_prompt - 1], "prompt_avg": h[: e.n_prompt].mean(0),
            "response_avg": h[e.n_prompt:].mean(0) if answer else None}


def test_projections_agree_with_output_hidden_states(lm):
    vec = _vec(0)
    df = project_rows(lm, ROWS, [Probe("evil", vec, (1,))], batch_size=2)
    u = vec.get(1) / vec.get(1).norm()
    for i, row in enumerate(ROWS):
        ref = _direct(lm, row, 1)
        for pool, x in ref.items():
            got = df.loc[i, f"evil@L1:{pool}"]
            if x is None:
                assert got != got  # NaN: no answer to average over
                continue
            assert abs(got - float(x @ u)) < 1e-4
            assert abs(df.loc[i, f"evil@L1:{pool}:cos"] - float(x @ u / x.norm())) < 1e-5


def test_several_vectors_in_one_pass_equal_separate_passes(lm):
    a, b = Probe("evil", _vec(1), (1, 2)), Probe("humor", _vec(2, "humorous"), (2,))
    both = project_rows(lm, ROWS, [a, b])
    alone_a, alone_b = project_rows(lm, ROWS, [a]), project_rows(lm, ROWS, [b])
    for c in alone_a.columns:
        torch.testing.assert_close(torch.tensor(both[c].to_numpy()), torch.tensor(alone_a[c].to_numpy()),
                                   equal_nan=True)
    for c in alone_b.columns:
        torch.testing.assert_close(torch.tensor(both[c].to_numpy()), torch.tensor(alone_b[c].to_numpy()),
                                   equal_nan=True)


def test_resumed_projection_file_is_identical(lm, tmp_path):
    src = tmp_path / "conv.jsonl"
    rows = [{**ROWS[i % 3], "id": i} for i in range(10)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probes = [Probe("evil", _vec(3), (1,))]
    ref = project_file(lm, src, probes, tmp_path / "ref.jsonl", chunk_rows=3)
    full = ref.read_text()
    lines = full.splitlines(keepends=True)
    assert len(lines) == 10 and json.loads(lines[4])["id"] == 4
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:6]) + lines[6][:25])  # two chunks done, a third one torn mid-line
    (tmp_path / "part.settings.json").write_text((tmp_path / "ref.settings.json").read_text())
    project_file(lm, src, probes, part, chunk_rows=3)
    assert part.read_text() == full


def test_a_projection_file_of_other_settings_is_refused_and_left_as_it_was(lm, tmp_path):
    """Rows of another vector, layers, poolings or input were appended under the old columns (or nothing done)."""
    from personavec.errors import PersonavecError

    src, other = tmp_path / "conv.jsonl", tmp_path / "other.jsonl"
    src.write_text("".join(json.dumps({**ROWS[i % 3], "id": i}) + "\n" for i in range(4)))
    other.write_text("".join(json.dumps({**ROWS[i % 3], "id": i}) + "\n" for i in range(5)))
    out = tmp_path / "proj.jsonl"
    probes = [Probe("evil", _vec(3), (1,))]
    project_file(lm, src, probes, out)
    before = out.read_bytes()
    for changed, what in (({"probes": [Probe("evil", _vec(4), (1,))]}, "probes[0].digest"),
                          ({"probes": [Probe("evil", _vec(3), (1, 2))]}, "probes[0].layers"),
                          ({"poolings": ["prompt_last"]}, "poolings"), ({"path": other}, "input.size")):
        kw = {"path": src, "probes": probes, **changed}
        with pytest.raises(PersonavecError, match=re.escape(what)):
            project_file(lm, kw.pop("path"), kw.pop("probes"), out, **kw)
        assert out.read_bytes() == before
    project_file(lm, src, probes, out)  # the same settings: accepted (nothing to add)
    assert out.read_bytes() == before
    with pytest.raises(PersonavecError, match="unknown pooling"):
        project_file(lm, src, probes, tmp_path / "new.jsonl", poolings=["prompt_middle"])
    assert not (tmp_path / "new.jsonl").exists() and not (tmp_path / "new.settings.json").exists()


def test_live_monitor_reports_each_token_and_stops_on_threshold(lm, tokenizer):
    v = _vec(4).get(1)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Why?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    seen = []
    mon = LiveMonitor(v, layer=1, threshold=float("inf"), on_token=lambda step, p: seen.append((step, p)))
    with mon.attach(lm):
        out = lm.model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                                stopping_criteria=mon.stopping_criteria())
    assert out.shape[1] == ids.shape[1] + 5 and [s for s, _ in seen] == [0, 1, 2, 3, 4]
    # step 0 reads the last prompt token: equals the direct projection
    with torch.no_grad():
        h = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1]
    assert abs(float(seen[0][1][0]) - float(h @ (v / v.norm()))) < 1e-4
    # a threshold below the first reading stops generation after one token
    low = LiveMonitor(v, layer=1, threshold=float(seen[0][1][0]) - 1.0)
    with low.attach(lm):
        out = lm.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                stopping_criteria=low.stopping_criteria())
    assert out.shape[1] == ids.shape[1] + 1 and bool(low.triggered[0])


def test_live_monitor_can_switch_on_suppressive_steering(lm, tokenizer):
    v = _vec(5).get(1) * 10
    ids = tokenizer("<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt",
                    add_special_tokens=False)["input_ids"]
    off = LiveMonitor(v, layer=1, threshold=float("inf"), action="steer", steer_coef=-1.0, where="after")
    with off.attach(lm):
        lm.model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    on = LiveMonitor(v, layer=1, threshold=-1e9, action="steer", steer_coef=-1.0, where="after")
    with on.attach(lm):
        lm.model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    # step 0 is read before any steering; afterwards the suppressive edit lowers the reading by |v|
    assert torch.allclose(on.history[0], off.history[0])
    assert float(on.history[1][0]) < float(off.history[1][0]) - 0.5 * float(v.norm())


def test_rows_without_a_chat_are_a_clear_error(lm):
    from personavec.errors import PersonavecError

    with pytest.raises(PersonavecError, match="needs 'messages'"):
        project_rows(lm, [{"text": "hi"}], [Probe("evil", _vec(0), (1,))])


def test_project_refuses_what_is_not_conversations_and_named_vectors(lm):
    from personavec.errors import PersonavecError
    from personavec.monitor.projections import project

    v = _vec(0)
    v.chosen_layer = 1
    cases = (([v], "a list"), ((v,), "a tuple"), (v, "a PersonaVector"),
             ({"evil": v.get(1)}, "a dict holding a torch tensor"))
    for vectors, shown in cases:
        with pytest.raises(PersonavecError, match=re.escape('project\'s vectors must be a dict of name -> '
                                                            f'PersonaVector, e.g. {{"evil": vec}}, not {shown}')):
            project(lm, ROWS, vectors)
    with pytest.raises(PersonavecError, match=r"project's conversations must be a list of dicts .* not None$"):
        project(lm, None, {"evil": v})
    with pytest.raises(PersonavecError, match=r'conversations must be .*, not "Hi" in the list'):
        project(lm, ["Hi"], {"evil": v})
    with pytest.raises(PersonavecError, match='project\'s layers must be a whole number \\(int\\), not "1"'):
        project(lm, ROWS, {"evil": v}, layers=["1"])
    with pytest.raises(PersonavecError, match='unknown pooling "mean" in project\'s poolings'):
        project(lm, ROWS, {"evil": v}, poolings=["mean"])
    with pytest.raises(PersonavecError, match="project's poolings must be a list"):
        project(lm, ROWS, {"evil": v}, poolings="response_avg")
    assert len(project(lm, ROWS, {"evil": v})) == 3 * 3


def test_a_vector_without_a_direction_at_a_layer_is_not_projected(lm, tmp_path):
    """A zero row projected every answer to 0 (a NaN cosine before the clamp): refused, naming the layer, in the API
    and before the CLI's projection file is written."""
    from personavec.errors import PersonavecError
    from personavec.monitor.projections import project

    v = _vec(0)
    v.tensors["response_avg"][0] = 0
    with pytest.raises(PersonavecError, match="the evil vector has no direction at layer 0 \\(its row there is zero\\)"
                                              "; it has one at layers 1-2"):
        project(lm, ROWS, {"evil": v}, layers=[0, 1])
    with pytest.raises(PersonavecError, match="no direction at layer 0"):
        project_rows(lm, ROWS, [Probe("evil", v, (0,))])
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(PersonavecError, match="no direction at layer 0"):
        project_file(lm, data, [Probe("evil", v, (0,))], tmp_path / "out.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_a_live_monitor_checks_its_fields_at_construction_and_the_size_at_attach(lm):
    from personavec.errors import PersonavecError

    v = _vec(0)
    cases = [
        ({"vector": v}, "LiveMonitor vector must be a 1-D torch tensor .*not a PersonaVector; take one layer's row "
                        "with vec.get\\(layer\\)"),
        ({"layer": "1"}, 'LiveMonitor layer must be a whole number \\(int\\), not "1"'),
        ({"threshold": "5"}, 'LiveMonitor threshold must be a number, not "5"'),
        ({"threshold": math.nan}, "LiveMonitor threshold must be a finite number, not nan"),
        ({"steer_coef": None}, "LiveMonitor steer_coef must be a number, not None"),
        ({"vector": torch.zeros(32)}, "LiveMonitor vector at layer 1 is zero: every reading would be 0"),
        ({"vector": torch.full((32,), math.inf)}, "LiveMonitor vector at layer 1 holds NaN or infinite values"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PersonavecError, match=message):
            LiveMonitor(**{"vector": v.get(1), "layer": 1, "threshold": 5.0, **kwargs})
    with pytest.raises(PersonavecError, match="LiveMonitor vector has 100 dims but the model's hidden size is 32"), \
            LiveMonitor(torch.randn(100), 1).attach(lm):
        pass
    assert LiveMonitor(v.get(1).tolist(), 1).threshold == math.inf  # a list is converted; no threshold: never stops
