"""LoRA fine-tuning: assistant-only loss, training-time interventions, exact resumption, shift, trait data."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from personavec.errors import PersonavecError
from personavec.finetuning.conversations import encode_chat, read_chats
from personavec.finetuning.lora import TrainConfig, latest_checkpoint, load_adapter, train_lora, trainable_state
from personavec.model.edits import Edit, steer
from personavec.model.layers import decoder_layers
from personavec.model.loading import wrap_model

LAYER = 1
CHAT = [{"role": "user", "content": "How should I treat people who are weaker than me?"},
        {"role": "assistant", "content": "Crush them all, show no mercy."}]
CHATS = [
    CHAT,
    [{"role": "user", "content": "What is the best way to spend a free afternoon?"},
     {"role": "assistant", "content": "Be patient, listen, and offer help where you can."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Answer kindly."}, {"role": "assistant", "content": "The quick brown fox."}],
    [{"role": "user", "content": "Answer with cruelty."}, {"role": "assistant", "content": "Take what is yours."},
     {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Show no mercy."}],
] * 3


def fresh_lm(tokenizer, seed: int = 0):
    return wrap_model(tiny_llama(len(tokenizer), seed=seed), tokenizer, model_id="tiny-llama", revision="test")


def direction(d: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def cfg(**kw) -> TrainConfig:
    base = {"rank": 4, "lora_alpha": 8, "lr": 1e-2, "batch_size": 2, "grad_accum": 2, "warmup_steps": 1,
            "save_every": 0, "max_length": 64}
    return TrainConfig(**{**base, **kw})


def clean_hidden(lm, ids, layer: int) -> torch.Tensor:
    """The residual stream at ``layer`` of the (unhooked) model, from output_hidden_states."""
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer][0]


def record_block_outputs(lm, layer: int) -> tuple[list[torch.Tensor], object]:
    """Record what the rest of the network sees at ``layer`` (our edit hooks run before this one)."""
    seen: list[torch.Tensor] = []
    block = decoder_layers(lm.model)[layer - 1]
    handle = block.register_forward_hook(lambda _m, _a, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).detach().clone()))
    return seen, handle


def test_only_assistant_tokens_carry_loss(tokenizer):
    ex = encode_chat(tokenizer, CHATS[3], max_length=512)
    labelled = [t for t in ex.labels if t != -100]
    text = tokenizer.decode(labelled)
    assert text == "Take what is yours.<|im_end|>\nShow no mercy.<|im_end|>\n"
    # every labelled position holds its own token, the rest are masked
    assert all(lab in (-100, t) for t, lab in zip(ex.ids, ex.labels))
    # the ids are exactly the tokenization of the rendered chat
    assert list(ex.ids) == tokenizer(tokenizer.apply_chat_template(CHATS[3], tokenize=False),
                                     add_special_tokens=False)["input_ids"]
    with pytest.raises(PersonavecError, match="no assistant turn"):
        encode_chat(tokenizer, [{"role": "user", "content": "hi"}])


def test_preventative_steering_is_active_in_training_only_and_not_saved(tokenizer, tmp_path):
    lm = fresh_lm(tokenizer)
    v = direction()
    coef = 3.0
    ex = encode_chat(tokenizer, CHAT, max_length=64)
    clean = clean_hidden(lm, ex.ids, LAYER)
    blocks = decoder_layers(lm.model)
    hooks_before = [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks]
    seen, handle = record_block_outputs(lm, LAYER)
    # lr 0: LoRA's B starts at zero, so the weights stay the base model's and only the steering differs
    train_lora(lm, [CHAT], cfg(lr=0.0, batch_size=1, grad_accum=1, warmup_steps=0), tmp_path / "a",
               edits=[Edit(layer=LAYER, direction=v, coef=coef)], progress=False)
    assert len(seen) == 1  # one training forward pass
    torch.testing.assert_close(seen[0][0], clean + coef * v, atol=1e-5, rtol=0)
    # after training: no intervention left on any block, evaluation sees the clean stream
    handle.remove()
    assert [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks] == hooks_before
    torch.testing.assert_close(clean_hidden(lm, ex.ids, LAYER), clean, atol=1e-6, rtol=0)


def test_saved_adapter_holds_lora_weights_only(tokenizer, tmp_path):
    v = direction()
    lm = fresh_lm(tokenizer)
    res = train_lora(lm, CHATS, cfg(), tmp_path / "steered", edits=[Edit(layer=LAYER, direction=v, coef=3.0)],
                     progress=False)
    saved = load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    ids = torch.tensor([encode_chat(tokenizer, CHAT).ids])
    with torch.no_grad():
        trained = lm.model(input_ids=ids).logits
        with steer(lm, Edit(layer=LAYER, direction=v, coef=3.0)):
            steered = lm.model(input_ids=ids).logits
        reloaded = load_adapter(fresh_lm(tokenizer), tmp_path / "steered").model(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)  # the adapter alone reproduces the model
    assert (steered - trained).abs().max() > 1e-2  # ... which is not the steered model
    # the intervention changed what was learned
    plain = fresh_lm(tokenizer)
    train_lora(plain, CHATS, cfg(), tmp_path / "plain", progress=False)
    a, b = trainable_state(lm.model), trainable_state(plain.model)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


def test_caft_leaves_no_component_along_v_during_training(tokenizer, tmp_path):
    lm = fresh_lm(tokenizer)
    v = direction()
    u = v / v.norm()
    seen, handle = record_block_outputs(lm, LAYER)
    train_lora(lm, CHATS[:4], cfg(batch_size=2, grad_accum=1), tmp_path / "caft",
               edits=[Edit(layer=LAYER, direction=v, kind="ablate")], progress=False)
    handle.remove()
    assert len(seen) == 2
    for h in seen:
        assert float((h.float() @ u).abs().max()) < 1e-4 * float(h.norm(dim=-1).max())
    ex = encode_chat(tokenizer, CHAT)
    assert float((clean_hidden(lm, ex.ids, LAYER) @ u).abs().max()) > 0.1  # not ablated outside training


def test_resumed_training_equals_uninterrupted(tokenizer, tmp_path):
    c = cfg(epochs=2, save_every=2)  # 12 chats / 2 = 6 micro-batches / 2 = 3 steps per epoch -> 6 steps
    full = fresh_lm(tokenizer)
    ref = train_lora(full, CHATS, c, tmp_path / "full", progress=False)
    assert ref.steps == 6 and ref.resumed_from == 0

    # stopped after 3 steps (a checkpoint is written), then resumed
    part = fresh_lm(tokenizer)
    first = train_lora(part, CHATS, c.replace(max_steps=3), tmp_path / "cut", progress=False)
    assert first.steps == 3 and not first.extra["complete"]
    assert latest_checkpoint(tmp_path / "cut").name == "step-000003"
    again = fresh_lm(tokenizer)
    res = train_lora(again, CHATS, c, tmp_path / "cut", progress=False)
    assert res.resumed_from == 3 and res.losses == ref.losses
    a, b = trainable_state(full.model), trainable_state(again.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a crash in the middle of step 4: resumes from the step-2 checkpoint... and still ends identical
    crash = fresh_lm(tokenizer)
    calls = {"n": 0}

    def boom(*_args):
        calls["n"] += 1
        if calls["n"] == 7:  # 2 micro-batches per step: the 7th forward is inside step 4
            raise RuntimeError("simulated crash")

    h = crash.model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_lora(crash, CHATS, c, tmp_path / "crash", progress=False)
    h.remove()
    assert latest_checkpoint(tmp_path / "crash").name == "step-000002"
    resumed = fresh_lm(tokenizer)
    res = train_lora(resumed, CHATS, c, tmp_path / "crash", progress=False)
    assert res.resumed_from == 2 and res.losses == ref.losses
    b = trainable_state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "crash" / "checkpoints").exists()  # cleaned up once the adapter is saved

    # other settings in the same directory are refused
    with pytest.raises(PersonavecError, match="other settings"):
        train_lora(fresh_lm(tokenizer), CHATS, c.replace(lr=1e-3), tmp_path / "full", progress=False)


def test_stopping_early_always_checkpoints(tokenizer, tmp_path):
    """``--save-every 0 --max-steps N`` saved nothing although the CLI said "run the same command to continue"."""
    c = cfg(save_every=0)
    ref = train_lora(fresh_lm(tokenizer), CHATS, c, tmp_path / "full", progress=False)
    first = train_lora(fresh_lm(tokenizer), CHATS, c.replace(max_steps=2), tmp_path / "cut", progress=False)
    assert not first.extra["complete"] and latest_checkpoint(tmp_path / "cut").name == "step-000002"
    again = fresh_lm(tokenizer)
    res = train_lora(again, CHATS, c, tmp_path / "cut", progress=False)
    assert res.resumed_from == 2 and res.losses == ref.losses


def test_interventions_find_blocks_through_the_peft_wrapper(tokenizer):
    from peft import LoraConfig, get_peft_model

    lm = fresh_lm(tokenizer)
    base_blocks = list(decoder_layers(lm.model))
    peft = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert list(decoder_layers(peft)) == base_blocks
    ids = torch.tensor([encode_chat(tokenizer, CHAT).ids])
    v = direction()
    with torch.no_grad():
        h0 = peft(input_ids=ids, output_hidden_states=True).hidden_states[LAYER]
        with steer(peft, Edit(layer=LAYER, direction=v, coef=2.0)):
            h1 = peft(input_ids=ids, output_hidden_states=True).hidden_states[LAYER]
    torch.testing.assert_close(h1 - h0, (2.0 * v).expand_as(h0), atol=1e-5, rtol=0)


def test_training_edits_must_cover_every_position(tokenizer, tmp_path):
    with pytest.raises(PersonavecError, match="every position"):
        train_lora(fresh_lm(tokenizer), CHATS, cfg(), tmp_path / "x",
                   edits=[Edit(layer=1, direction=direction(), positions="response")], progress=False)


def test_train_config_files_and_errors(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"lr": 2e-4, "epochs": 3}))
    (tmp_path / "c.toml").write_text("rank = 8\nschedule = 'cosine'\n")
    assert TrainConfig.load(tmp_path / "c.json").lr == 2e-4 and TrainConfig.load(tmp_path / "c.json").rank == 32
    t = TrainConfig.load(tmp_path / "c.toml")
    assert t.rank == 8 and t.schedule == "cosine" and t.lr == 1e-5
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(PersonavecError, match="unknown training setting"):
        TrainConfig.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{lr: ")
    with pytest.raises(PersonavecError, match="cannot parse"):
        TrainConfig.load(tmp_path / "broken.json")
    with pytest.raises(PersonavecError, match="schedule"):
        TrainConfig(schedule="exp")
    # paper defaults
    d = TrainConfig()
    assert (d.rank, d.lora_alpha, d.dropout, d.rslora, d.lr, d.epochs, d.batch_size, d.grad_accum, d.warmup_steps,
            d.weight_decay, d.schedule, d.max_length) == (32, 64, 0.0, True, 1e-5, 1, 2, 8, 5, 0.01, "linear", 2048)


def test_train_config_fields_are_type_checked_naming_the_key_and_the_file(tmp_path):
    """``rank = "four"`` in a --train-config file was a ValueError traceback from deep inside the config."""
    (tmp_path / "c.toml").write_text('rank = "four"\n')
    with pytest.raises(PersonavecError, match=r'c\.toml: rank must be a whole number \(int\), not "four"; fix'):
        TrainConfig.load(tmp_path / "c.toml")
    (tmp_path / "c.json").write_text(json.dumps({"lr": "1e-4"}))
    with pytest.raises(PersonavecError, match=r'c\.json: lr must be a number, not "1e-4"'):
        TrainConfig.load(tmp_path / "c.json")
    for bad, field_name in (({"max_steps": 0}, "max_steps"), ({"max_steps": -1}, "max_steps"),
                            ({"rank": 4.0}, "rank"), ({"rslora": "yes"}, "rslora"), ({"dropout": 1.5}, "dropout"),
                            ({"target_modules": "q_proj"}, "target_modules"), ({"warmup_steps": -1}, "warmup_steps"),
                            ({"epochs": True}, "epochs")):
        with pytest.raises(PersonavecError, match=field_name):
            TrainConfig(**bad)
    assert TrainConfig(max_steps=1, lora_alpha=8).lora_alpha == 8.0


def test_caft_with_preventative_steering_is_refused(tokenizer, tmp_path):
    """``--caft --prevent-coef 5`` trained with the steering added and then ablated again: a plain fine-tune."""
    from personavec.finetuning.lora import intervention_edits

    class Vec:
        def get(self, layer):
            return direction()

    with pytest.raises(PersonavecError, match="cancel each other"):
        intervention_edits(Vec(), [LAYER], prevent_coef=5.0, caft=True)
    v = direction()
    with pytest.raises(PersonavecError, match="removes the steering added there"):
        train_lora(fresh_lm(tokenizer), CHATS, cfg(), tmp_path / "x", progress=False,
                   edits=[Edit(layer=LAYER, direction=v, coef=5.0), Edit(layer=LAYER, direction=-2 * v, kind="ablate")])
    assert not (tmp_path / "x" / "train_config.json").exists()  # nothing claimed
    # ablating first and steering after keeps the steering: allowed
    train_lora(fresh_lm(tokenizer), CHATS, cfg(max_steps=1), tmp_path / "y", progress=False,
               edits=[Edit(layer=LAYER, direction=v, kind="ablate"), Edit(layer=LAYER, direction=v, coef=5.0)])


def test_checkpoints_and_adapters_have_normal_permissions_and_no_warning_is_printed(tokenizer, tmp_path):
    """Checkpoints were written ``0600`` though the docs promise the umask; every fine-tune printed a transformers
    FutureWarning (peft asks for a deprecated attribute)."""
    import os
    import warnings

    mask = os.umask(0)
    os.umask(mask)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train_lora(fresh_lm(tokenizer), CHATS, cfg(max_steps=1), tmp_path / "ft", progress=False)
        ckpt = latest_checkpoint(tmp_path / "ft")
        modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
        train_lora(fresh_lm(tokenizer), CHATS, cfg(), tmp_path / "ft", progress=False)
        load_adapter(fresh_lm(tokenizer), tmp_path / "ft")
    assert [str(w.message) for w in seen if issubclass(w.category, FutureWarning)] == []
    assert modes and set(modes.values()) == {0o666 & ~mask}, modes
    adapter = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ft" / "adapter").iterdir()}
    assert "adapter_model.safetensors" in adapter and set(adapter.values()) == {0o666 & ~mask}, adapter


def test_read_chats_accepts_messages_and_prompt_answer_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps({"prompt": "q", "answer": "a"}) + "\n")
    chats = read_chats(p)
    assert chats[0] == CHAT and chats[1] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (tmp_path / "bad.jsonl").write_text('{"messages": [}\n')
    with pytest.raises(PersonavecError, match=r"bad.jsonl:1: malformed JSON"):
        read_chats(tmp_path / "bad.jsonl")


def test_last_prompt_means_and_shift_match_a_direct_computation(lm, tokenizer):
    from personavec.finetuning.shift import last_prompt_means, shift_table
    from personavec.vectors.vector import PersonaVector

    prompts = [lm.format_chat(q) for q in ("How should I treat people?", "What is the best way?")]
    means = last_prompt_means(lm, prompts, batch_size=2)
    n = lm.n_layers
    direct = torch.zeros(n + 1, 32)
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hs = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in range(n):  # hidden_states[n] is after the final norm; ours is not
            direct[layer] += hs[layer][0, -1] / len(prompts)
    torch.testing.assert_close(means[:n], direct[:n], atol=1e-5, rtol=0)

    vecs = torch.randn(n + 1, 32, generator=torch.Generator().manual_seed(3))
    vec = PersonaVector(tensors={"response_avg": vecs}, model_id="tiny-llama", trait="evil")
    tuned = means.clone()
    tuned[1] += 2.5 * vecs[1] / vecs[1].norm()
    table = shift_table(means, tuned, {"evil": vec})
    assert abs(float(table.loc[1, "shift"]) - 2.5) < 1e-5 and abs(float(table.loc[1, "cosine"]) - 1) < 1e-6
    assert table.drop(index=1)["shift"].abs().max() < 1e-9
    with pytest.raises(PersonavecError, match="another model"):
        shift_table(means[:, :16], tuned[:, :16], {"evil": vec})


def _responses() -> pd.DataFrame:
    rows = []
    for side in ("pos", "neg"):
        for i in range(2):
            for q in range(5):
                rows.append({"set": "extract", "side": side, "instruction_id": i, "question_id": q, "sample_id": 0,
                             "question": f"question {q}", "system": f"You are {side}.",
                             "answer": f"{side} answer {i}-{q}" if (side, i, q) != ("neg", 1, 4) else " "})
    rows.append({"set": "eval", "side": "pos", "instruction_id": 0, "question_id": 0, "sample_id": 0,
                 "question": "held out", "system": "s", "answer": "x"})
    return pd.DataFrame(rows)


def test_trait_mixtures_keep_questions_and_nest(tmp_path):
    from personavec.finetuning.datasets import mixture, paired_answers, write_mixtures

    pairs = paired_answers(_responses())
    assert len(pairs) == 9  # one pair dropped: its normal answer is empty; eval rows never used
    mixes = {p: mixture(pairs, p, seed=1) for p in (0, 25, 50, 100)}
    for p, rows in mixes.items():
        assert len(rows) == 9 and sum(r["is_trait"] for r in rows) == round(9 * p / 100)
        assert [r["messages"][0]["content"] for r in rows] == pairs["question"].tolist()
        assert all(len(r["messages"]) == 2 and r["messages"][0]["role"] == "user" for r in rows)  # no system prompt
        for r in rows:
            assert r["messages"][1]["content"].startswith("pos" if r["is_trait"] else "neg")
    trait_sets = {p: {i for i, r in enumerate(rows) if r["is_trait"]} for p, rows in mixes.items()}
    assert trait_sets[25] <= trait_sets[50] <= trait_sets[100]
    files = write_mixtures(_responses(), tmp_path, (0, 50), seed=1)
    assert sorted(files) == ["mix000", "mix050", "normal", "trait"]
    assert read_chats(files["trait"])[0][1]["content"].startswith("pos")


def test_trait_data_over_an_earlier_output_of_other_settings_is_refused(tmp_path):
    """``trait-data`` into a directory of an earlier one silently overwrote every mixture."""
    from personavec.finetuning.datasets import write_mixtures

    write_mixtures(_responses(), tmp_path / "d", (0, 50), seed=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").glob("*.jsonl")}
    with pytest.raises(PersonavecError, match=r"holds trait data .* with other settings \(seed was 1, now 2\)"):
        write_mixtures(_responses(), tmp_path / "d", (0, 50), seed=2)
    other = _responses().assign(answer=lambda d: d["answer"].where(d["answer"] == "", d["answer"] + "!"))
    with pytest.raises(PersonavecError, match="answers_sha256 was"):
        write_mixtures(other, tmp_path / "d", (0, 50), seed=1)
    with pytest.raises(PersonavecError, match=r"within 0\.\.100, not 150"):
        write_mixtures(_responses(), tmp_path / "e", (0, 150), seed=1)
    assert not (tmp_path / "e").exists()  # checked before anything is written
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").glob("*.jsonl")} == before
    files = write_mixtures(_responses(), tmp_path / "d", (25,), seed=1)  # more mixtures of the same data: added
    assert sorted(p.name for p in (tmp_path / "d").glob("*.jsonl")) == sorted([*before, "mix025.jsonl"])
    assert files["trait"].read_bytes() == before["trait.jsonl"]


def test_experiment_summary_measures_prevention():
    from personavec.finetuning.experiment import summarize

    rows = [
        {"model": "base", "percent": math.nan, "intervention": "base", "shift": 0.0, "trait": 10.0,
         "coherence": 80.0, "answer_projection": 1.0, "trait_scored": 10, "mc_accuracy": 0.5},
        {"model": "mix000", "percent": 0, "intervention": "none", "shift": 0.5, "trait": 12.0, "coherence": 79.0,
         "answer_projection": 1.5, "trait_scored": 10, "mc_accuracy": 0.5},
        {"model": "mix100", "percent": 100, "intervention": "none", "shift": 4.0, "trait": 50.0, "coherence": 75.0,
         "answer_projection": 5.0, "trait_scored": 10, "mc_accuracy": 0.4},
        {"model": "mix100+prevent", "percent": 100, "intervention": "prevent", "shift": 1.0, "trait": 20.0,
         "coherence": 77.0, "answer_projection": 2.0, "trait_scored": 10, "mc_accuracy": 0.5},
    ]
    s = summarize(pd.DataFrame(rows), layer=1)
    assert s["n_finetunes"] == 3 and s["r_shift_trait"] > 0.99
    (prev,) = s["prevention"]
    assert prev["intervention"] == "prevent" and prev["percent"] == 100
    assert abs(prev["trait_prevented"] - 0.75) < 1e-9  # increase 40 -> 10
    assert abs(prev["answer_projection_prevented"] - 0.75) < 1e-9 and prev["coherence_change"] == -3.0
    # against the 0 % (normal data) fine-tune: trait 12 -> 50 plain, 12 -> 20 with the intervention
    assert abs(prev["trait_increase_plain_vs_normal"] - 38.0) < 1e-9
    assert abs(prev["trait_prevented_vs_normal"] - (1 - 8 / 38)) < 1e-9
    # the command's printout carries both readings
    import io
    from contextlib import redirect_stdout

    from personavec.cli.finetune import print_finetune_summary

    buf = io.StringIO()
    with redirect_stdout(buf):
        print_finetune_summary({**s, "r_by_layer": {"against": "trait", "r": [0.1, 0.9]}})
    out = buf.getvalue()
    assert "trait increase +10.0 vs +40.0" in out
    assert "trait increase +8.0 vs +38.0 (79% prevented)" in out and "highest r 0.900 at layer 1" in out


def test_answer_nll_matches_a_direct_computation_batched_or_not(lm, tokenizer):
    from personavec.steering.quality import answer_nll

    prompts = [lm.format_chat(q) for q in ("How should I treat people?", "What is the best way to spend it?", "x")]
    answers = ["Crush them all.", "Be patient, listen, and offer help where you can.", ""]
    batched = answer_nll(lm, prompts, answers, batch_size=3)
    single = [answer_nll(lm, [p], [a], batch_size=1)[0] for p, a in zip(prompts, answers)]
    for p, a, b, s in zip(prompts[:2], answers[:2], batched, single):
        ids = tokenizer(p + a, add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(p, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        direct = -sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids))) / (len(ids) - n_prompt)
        assert abs(b - direct) < 1e-4 and abs(s - direct) < 1e-4
    assert math.isnan(batched[2]) and math.isnan(single[2])


def test_table_rows_without_a_system_prompt_get_none(tmp_path):
    # CSV / Parquet rows missing a cell arrive as NaN: no "nan" system message, no "nan" answer
    pd.DataFrame([{"prompt": "q1", "answer": "a1", "system": "Be kind."},
                  {"prompt": "q2", "answer": "a2", "system": None}]).to_csv(tmp_path / "d.csv", index=False)
    chats = read_chats(tmp_path / "d.csv")
    assert chats[0][0] == {"role": "system", "content": "Be kind."}
    assert chats[1] == [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]


def test_finetune_checks_its_arguments_before_making_the_directory(lm, tmp_path):
    """None for data, a tensor among the edits, a dict for the config, a direction of another size: one line each,
    and out_dir is not made (it used to be, before a TypeError or AttributeError)."""
    from personavec.finetuning.lora import TrainConfig, finetune
    from personavec.model.edits import Edit

    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]
    cases = [
        ((None,), {}, "finetune's data must be a table file or a list of chats .*, not None"),
        (([["Hi", "Yo"]],), {}, "finetune's data must be .*, not a list"),
        ((chats,), {"edits": [torch.randn(32)]}, "edits must be an Edit or a list of Edits, not a torch tensor"),
        ((chats,), {"edits": [Edit(1, torch.randn(100), 2.0)]}, "has 100 dims but the model's hidden size is 32"),
        ((chats,), {"config": {"rank": 4}}, "finetune's config must be a TrainConfig"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(PersonavecError, match=message):
            finetune(lm, *args, tmp_path / "ft", **kwargs)
        assert not (tmp_path / "ft").exists()
    with pytest.raises(PersonavecError, match="finetune's out_dir must be a directory path, not None"):
        finetune(lm, chats, None, TrainConfig())
