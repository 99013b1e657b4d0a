"""Bad input and faults, as a new user meets them: the real CLI in a subprocess, one line on stderr naming the
problem (no traceback), a non-zero exit, and nothing lost or half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import official_frames

pytestmark = pytest.mark.slow  # each case starts a Python process (about 4 s)

READ_ONLY = Path("/sys/personavec-test")  # writable by nobody, root included


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "personavec.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=600)


def fails(result: subprocess.CompletedProcess, *needles: str) -> str:
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith("personavec: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def files_in(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def tables(tmp_path, tokenizer):
    pos, neg = official_frames(tokenizer, [90, 80, 30, 95], [5, 10, 2, 70])
    pos.to_csv(tmp_path / "pos.csv", index=False)
    neg.to_csv(tmp_path / "neg.csv", index=False)
    return tmp_path / "pos.csv", tmp_path / "neg.csv"


@pytest.fixture
def vector(tmp_path, model_dir, tables):
    out = tmp_path / "evil.safetensors"
    r = cli("extract", "--pos", tables[0], "--neg", tables[1], "--trait", "evil", "--model", model_dir, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_bad_tables_fail_before_the_model_loads(tmp_path, tables, tokenizer):
    pos, neg = tables
    no_answer = tmp_path / "no_answer.csv"
    pd.read_csv(pos).drop(columns=["answer"]).to_csv(no_answer, index=False)
    # the model does not even exist: the table's error must come first
    fails(cli("extract", "--pos", no_answer, "--neg", neg, "--model", tmp_path / "nowhere", "--out", tmp_path / "v"),
          "no 'answer' column")
    tokenizer.save_pretrained(tmp_path / "tokenizer-only")
    fails(cli("extract", "--pos", pos, "--neg", neg, "--model", tmp_path / "tokenizer-only", "--out",
              tmp_path / "v.safetensors"), "holds no model")
    assert not (tmp_path / "v.safetensors").exists()


def test_writes_into_a_read_only_place_are_one_line(tmp_path, model_dir, tables, vector):
    pos, neg = tables
    # extract fails before computing anything (no progress bar, no model-load line on stderr)
    fails(cli("extract", "--pos", pos, "--neg", neg, "--model", model_dir, "--out", READ_ONLY / "v.safetensors"),
          str(READ_ONLY))
    fails(cli("vectors", "export-gguf", vector, "--layers", "2", "--out", READ_ONLY / "v.gguf"), str(READ_ONLY))
    fails(cli("run", "--trait", "evil", "--model", model_dir, "--judge", "none", "--out", READ_ONLY),
          str(READ_ONLY))
    before = files_in(tmp_path)
    fails(cli("project", tables[0], "--vector", vector, "--layers", "1", "--model", model_dir, "--out",
              READ_ONLY / "p.jsonl"), str(READ_ONLY))
    assert files_in(tmp_path) == before


def test_non_finite_numbers_are_refused(tmp_path, model_dir, tables, vector):
    fails(cli("steer", "Hi", "--vector", vector, "--layer", "1", "--coef", "nan", "--model", model_dir),
          "--coef: nan is not a finite number")
    fails(cli("run", "--trait", "evil", "--model", model_dir, "--steer-coefs=-1,inf", "--out", tmp_path / "runs"),
          "--steer-coefs: inf is not a finite number")
    assert not (tmp_path / "runs").exists()  # no run.json holding a bare NaN
    # vector files holding NaN / inf: refused on load and on import
    from safetensors.torch import load_file, save_file

    t = load_file(str(vector))
    t["response_avg"][1, 3] = float("nan")
    from safetensors import safe_open

    with safe_open(str(vector), framework="pt") as f:
        meta = f.metadata()
    save_file(t, str(tmp_path / "nan.safetensors"), metadata=meta)
    fails(cli("steer", "Hi", "--vector", tmp_path / "nan.safetensors", "--layer", "1", "--model", model_dir),
          "NaN or infinite", "layer(s) 1")
    torch.save(torch.full((3, 32), float("inf")), tmp_path / "evil_response_avg_diff.pt")
    fails(cli("vectors", "import-official", tmp_path / "evil_response_avg_diff.pt", "--out",
              tmp_path / "imp.safetensors"), "NaN or infinite")
    assert not (tmp_path / "imp.safetensors").exists()


def test_unreadable_scores_and_missing_answers_are_counted_not_swallowed(tmp_path, model_dir, tables):
    pos, neg = (pd.read_csv(p) for p in tables)  # pairs 0 and 1 pass the filter
    text_score = pos.assign(evil=pos["evil"].astype(object))
    text_score.loc[1, "evil"] = "high"  # text in a score column
    text_score.to_csv(tmp_path / "p.csv", index=False)
    r = cli("extract", "--pos", tmp_path / "p.csv", "--neg", tables[1], "--trait", "evil", "--model", model_dir,
            "--out", tmp_path / "v.safetensors")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 cells of column 'evil' are not numbers (e.g. 'high')" in r.stderr and "kept 1 of 4 pairs" in r.stdout
    no_answer = neg.copy()
    no_answer.loc[0, "answer"] = None  # an empty answer: it passed the filter as the string "nan"
    no_answer.to_json(tmp_path / "n.jsonl", orient="records", lines=True)
    r = cli("extract", "--pos", tables[0], "--neg", tmp_path / "n.jsonl", "--trait", "evil", "--model", model_dir,
            "--out", tmp_path / "v.safetensors")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kept 1 of 4 pairs" in r.stdout


def test_long_answers_are_cut_to_the_models_context_and_counted(tmp_path, model_dir, tables):
    pos = pd.read_csv(tables[0])
    pos.loc[2, "answer"] = "Crush them all. " * 12_500  # 200 000 characters
    pos.to_csv(tmp_path / "long.csv", index=False)
    r = cli("extract", "--pos", tmp_path / "long.csv", "--neg", tables[1], "--no-filter", "--model", model_dir,
            "--out", tmp_path / "v.safetensors")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 of 4 rows are longer than 256 tokens" in r.stderr  # the tiny model's context
    # a cap shorter than the prompts leaves no answer to average: said, not averaged over nothing
    r = cli("extract", "--pos", tmp_path / "long.csv", "--neg", tables[1], "--no-filter", "--max-length", "40",
            "--model", model_dir, "--out", tmp_path / "v2.safetensors")
    assert r.returncode == 2 and "prompts alone fill the --max-length of 40 tokens" in r.stderr
    assert not (tmp_path / "v2.safetensors").exists()


def test_generator_endpoint_errors_name_the_generator(tmp_path, model_dir):
    fails(cli("run", "--trait", "sarcastic", "--description", "Mocks the user.", "--generator", "openai:gen",
              "--generator-base-url", "http://127.0.0.1:9/v1", "--model", model_dir, "--judge", "none",
              "--out", tmp_path / "runs", env={"OPENAI_API_KEY": "k"}),
          "generator endpoint http://127.0.0.1:9/v1 unreachable", "--generator-base-url")
    assert not (tmp_path / "runs").exists()


def test_vector_files_are_checked_against_the_models_config_and_gguf_is_accepted(tmp_path, model_dir, vector):
    from personavec.vectors.vector import PersonaVector

    foreign = PersonaVector(tensors={"response_avg": torch.randn(5, 16)}, model_id="other")
    foreign.save(tmp_path / "foreign.safetensors")
    # refused from the config alone: no model-load line precedes the error
    fails(cli("steer", "Hi", "--vector", tmp_path / "foreign.safetensors", "--layer", "1", "--model", model_dir),
          "extract a vector for this model")
    fails(cli("steer", "Hi", "--vector", vector, "--layer", "7", "--model", model_dir),
          "--layer 7 is out of range: the model has layers 0..2")
    assert cli("vectors", "export-gguf", vector, "--layers", "2", "--out", tmp_path / "v.gguf").returncode == 0
    r = cli("steer", "Hi", "--vector", tmp_path / "v.gguf", "--coef", "2", "--model", model_dir,
            "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at layer 2" in r.stdout  # the control vector's one layer is its chosen layer
    assert oct(vector.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def test_a_projection_into_an_output_of_other_settings_or_with_bad_settings(tmp_path, model_dir, tables, vector):
    data = tmp_path / "conv.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Go away."}]}) + "\n")
    out = tmp_path / "proj.jsonl"
    base = ["project", data, "--vector", vector, "--model", model_dir, "--out", out]
    assert cli(*base, "--layers", "1").returncode == 0
    before = out.read_bytes()
    fails(cli(*base, "--layers", "2"), "holds projections with other settings", "probes[0].layers was [1], now [2]")
    assert out.read_bytes() == before
    fails(cli(*base[:-1], tmp_path / "new.jsonl", "--layers", "1", "--poolings", "prompt_middle"), "unknown pooling")
    assert not (tmp_path / "new.jsonl").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_bytes(args: list, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """The CLI with raw bytes on stdin and in argv (what a shell passes on), output decoded for the asserts."""
    r = subprocess.run([sys.executable, "-m", "personavec.cli", *(a if isinstance(a, bytes) else str(a) for a in args)],
                       input=stdin, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                       r.stderr.decode("utf-8", "replace"))


def test_text_that_is_not_utf8_is_read_with_a_warning_not_a_traceback(model_dir, vector):
    # piped into chat: the undecodable byte becomes U+FFFD (said once per line on stderr) and the chat goes on
    steer = ["--vector", vector, "--layer", "1", "--model", model_dir, "--dtype", "float32", "--max-new-tokens", "2"]
    r = run_bytes(["chat", *steer], stdin=b"Hi\xff there\nWhy?\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "line 1 of the input is not UTF-8 text" in r.stderr and "line 2" not in r.stderr
    assert "you> Hi\ufffd there" in r.stdout and r.stdout.count("unsteered") == 2
    # the question of steer, given as bytes in argv
    r = run_bytes(["steer", b"Hi\xff", *steer])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "the question is not UTF-8 text" in r.stderr and "Q: Hi\ufffd" in r.stdout


def test_bad_values_of_vector_and_model_flags_are_one_line_before_anything_is_written(tmp_path, model_dir, vector):
    gguf = ["vectors", "export-gguf", vector, "--layers", "2"]
    fails(cli(*gguf, "--pooling", "nope", "--out", tmp_path / "v.gguf"),
          "--pooling nope", "prompt_avg, prompt_last, response_avg")
    fails(cli(*gguf, "--out", tmp_path), f"--out {tmp_path} is a directory")
    fails(cli(*gguf, "--out", tmp_path / "v.txt"), "ends in .txt", "name a file ending in .gguf")
    fails(cli("vectors", "export-gguf", vector, "--layers", "2-1", "--out", tmp_path / "v.gguf"),
          "--layers 2-1", "runs backwards", "write it 1-2")
    fails(cli("vectors", "info", tmp_path), "is a directory", ".safetensors")
    fails(cli("vectors", "import-official", vector, "--out", tmp_path / "imported.safetensors"),
          "official persona_vectors .pt")
    fails(cli("steer", "Hi", "--vector", tmp_path, "--model", model_dir), f"--vector {tmp_path} is a directory")
    fails(cli("steer", "Hi", "--vector", vector, "--layer", "1", "--model", model_dir, "--device", "nope"),
          "--device: nope is not a device")
    fails(cli("steer", "Hi", "--vector", vector, "--layer", "1", "--model", model_dir, "--device", "cuda:99"),
          "--device: cuda:99: this machine has")  # no CUDA device, or CUDA devices 0..N
    fails(cli("steer", "Hi", "--vector", vector, "--layer", "1", "--model", model_dir, "--dtype", "fp33"),
          "--dtype: fp33 is not a dtype; use auto, float32, bfloat16 or float16")
    fails(cli("project", vector, "--vector", vector, "--layers", "1", "--model", model_dir, "--out",
              tmp_path / "p.txt"), "--out", "p.txt ends in .txt; name a file ending in .jsonl")
    assert not list(tmp_path.glob("[vp].*")) and not (tmp_path / "imported.safetensors").exists()



def test_extract_checks_its_out_suffix_before_the_model_loads(tmp_path, tables):
    """``--out v.txt`` was refused by the vector's save, after the model loaded and the extraction ran."""
    for out, says in ((tmp_path / "v.txt", "ends in .txt; name a file ending in .safetensors"),
                      (tmp_path / "v", "has no suffix; name a file ending in .safetensors")):
        fails(cli("extract", "--pos", tables[0], "--neg", tables[1], "--trait", "evil", "--model",
                  tmp_path / "nowhere", "--out", out), f"--out {out} {says}")
    assert not list(tmp_path.glob("v*"))

def test_messages_show_values_as_typed_and_name_the_flag(tmp_path, model_dir, tables, vector):
    err = fails(cli("steer", "Hi", "--vector", vector, "--coef", "nan", "--model", model_dir),
                "--coef: nan is not a finite number")
    assert "'nan'" not in err
    fails(cli("steer", "Hi", "--vector", vector, "--max-new-tokens", "", "--model", model_dir),
          "--max-new-tokens: '' is not a whole number")
    fails(cli("steer", "Hi", "--vector", vector, "--units", "foo", "--model", model_dir),
          "--units: invalid choice: foo (choose from raw, norm)")  # argparse's own lines too
    fails(cli("steer", "Hi", "--vector", vector, "--layer", "x", "--model", model_dir),
          "--layer: x is not a whole number")
    fails(cli("extract", "--pos", tables[0], "--neg", tables[1], "--layers", "1, 9", "--model", model_dir, "--out",
              tmp_path / "v.safetensors"), "--layers '1, 9': layer 9 is out of range")  # quoted where a shell would
    fails(cli("run", "--trait", "évil", "--model", model_dir, "--judge", "none", "--out", tmp_path / "runs"),
          "--trait évil:", "ASCII letters")
    fails(cli("run", "--trait", "evil", "--model", model_dir, "--judge", "bogus", "--out", tmp_path / "runs"),
          "--judge bogus is not one of the kinds it takes; use local, local:MODEL, openai:MODEL or none")
    fails(cli("run", "--trait", "evil", "--model", model_dir, "--sampler", "vllm", "--out", tmp_path / "runs"),
          "--sampler vllm is not one of the kinds it takes; use local or openai:MODEL")
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "adapter_config.json").write_text("{}")  # enough to pass the adapter check, not to load
    fails(cli("shift", "--adapter", tmp_path / "ft", "--vector", vector, "--model", model_dir, "--out", "s1"),
          "--out s1 has no suffix", ".csv, .jsonl, .json or .parquet")
    for p in ("0", "100"):
        fails(cli("screen", tables[0], "--vector", vector, "--percentile", p, "--model", model_dir, "--out",
                  tmp_path / "screen"), f"--percentile {p} is out of range", "0 < p < 100")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "screen").exists() and not Path("s1").exists()


def test_chat_reads_all_piped_input_and_remembers_the_conversation_until_reset(tmp_path, model_dir, vector,
                                                                                tokenizer):
    from personavec.model.chat import format_chat

    # a question of about 80 tokens with 150 tokens of answer fits the tiny model's 256; two of them do not, which
    # shows that the second turn carries the first (and /reset forgets it)
    question = "Tell me about foxes. " * 4
    assert 70 <= len(tokenizer(format_chat(tokenizer, question))["input_ids"]) <= 100
    steer = ["--vector", vector, "--layer", "1", "--coef", "2", "--model", model_dir, "--dtype", "float32"]
    r = run_bytes(["chat", *steer, "--max-new-tokens", "150"],
                  stdin=f"{question}\n\n{question}\n/reset\n\n{question}\n".encode())
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.count("| steered (evil x 2 (raw units))") == 2  # the turns before and after /reset
    refused = [line for line in r.stderr.splitlines() if line.startswith("personavec:")]
    assert len(refused) == 1 and "context of 256 tokens" in refused[0], r.stderr[-2000:]
    assert "/reset" in refused[0] and "conversation forgotten" in r.stdout
    r = cli("chat", "--help")
    assert "remembers" in r.stdout and "/reset" in r.stdout


def test_ctrl_c_ends_a_chat_quietly(model_dir, vector):
    import signal

    # SIGINT must reach the chat even when the tests run in a background job (which ignores it)
    proc = subprocess.Popen([sys.executable, "-m", "personavec.cli", "chat", "--vector", str(vector), "--layer", "1",
                             "--model", str(model_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("steering:")  # waiting for the first question
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "personavec: chat ended" and "run the same command" not in err


def test_a_prompt_longer_than_the_context_is_one_line(model_dir, vector):
    long = "Tell me about foxes. " * 100
    steer = ["--vector", vector, "--layer", "1", "--model", model_dir, "--max-new-tokens", "3"]
    r = cli("steer", long, *steer)  # the model's context is known once it loads: its log lines come first
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("personavec")]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1]
    assert errors[0].startswith("personavec: error: ") and "context of 256 tokens" in errors[0]
    assert "--max-new-tokens" in errors[0]
    r = run_bytes(["chat", *steer], stdin=f"{long}\nWhy?\n".encode())  # said, and the chat goes on
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "context of 256 tokens" in r.stderr and "/reset" not in r.stderr and r.stdout.count("unsteered") == 1


def test_commands_check_everything_before_they_write_and_end_without_a_traceback(tmp_path, model_dir, vector):
    """#22: a failed start claimed the directory (run's judge model, monitor's --layer, finetune's --max-steps), the
    corrected command was refused; finetune --train-config and a one-row screen ended in a traceback; extract made
    zero vectors; --caft cancelled --prevent-coef; trait-data overwrote an earlier output."""
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"prompt": "How are you?", "answer": "Fine, thank you."}) + "\n")
    (tmp_path / "c.toml").write_text('rank = "four"\n')
    ft = ["finetune", chats, "--model", model_dir, "--out", tmp_path / "ft"]
    fails(cli(*ft, "--train-config", tmp_path / "c.toml"), "c.toml: rank must be a whole number", '"four"')
    for steps in ("0", "-1"):
        fails(cli(*ft, "--max-steps", steps), "--max-steps", "must be at least 1")
    fails(cli(*ft, "--vector", vector, "--caft", "--prevent-coef", "5"), "--prevent-coef 5 with --caft cancel")
    assert not (tmp_path / "ft").exists()
    # a local judge's model, and an experiment's --layer, are checked before anything is written
    fails(cli("run", "--trait", "evil", "--model", model_dir, "--judge", "local:nonexistent-model", "--quick",
              "--run-dir", tmp_path / "run"), "judge local:nonexistent-model", "could not load model")
    fails(cli("monitor", "--trait", "evil", "--model", model_dir, "--layer", "3", "--judge", "none",
              "--run-dir", tmp_path / "run"), "--layer 3 is out of range", "has layers 0..2")
    fails(cli("finetune-experiment", "--trait", "evil", "--model", model_dir, "--percents", "0,150", "--run-dir",
              tmp_path / "run"), "--percents: 150 is not a percentage")
    fails(cli("screen-experiment", "--trait", "evil", "--model", model_dir, "--mix-percent", "0", "--run-dir",
              tmp_path / "run"), "--mix-percent 0 is not a trait share")
    assert not (tmp_path / "run").exists()
    # extract: pos equal to neg, a layer out of range: refused before the model loads (it does not even exist)
    pos = tmp_path / "copy.csv"
    pd.read_csv(vector.parent / "pos.csv").to_csv(pos, index=False)
    fails(cli("extract", "--pos", pos, "--neg", pos, "--model", tmp_path / "nowhere", "--out", tmp_path / "v"),
          "--pos and --neg are the same file")
    fails(cli("extract", "--pos", pos, "--neg", vector.parent / "pos.csv", "--model", tmp_path / "nowhere", "--out",
              tmp_path / "v"), "hold the same prompts and answers", "would be zero")
    fails(cli("extract", "--pos", pos, "--neg", vector.parent / "neg.csv", "--model", model_dir, "--layers", "5",
              "--out", tmp_path / "v"), "--layers 5: layer 5 is out of range", "has layers 0..2")
    assert not (tmp_path / "v").exists()
    # shift: the adapter is looked for before the model loads (it does not even exist)
    fails(cli("shift", "--adapter", tmp_path / "ft", "--vector", vector, "--model", tmp_path / "nowhere"),
          "holds no adapter")
    # screen on one row: the sd of one value is not a number, the summary says so
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "How are you?", "answer": "Fine."}) + "\n")
    r = cli("screen", one, "--vector", vector, "--layers", "1", "--mode", "response", "--model", model_dir,
            "--out", tmp_path / "screen")
    assert r.returncode == 0 and "Traceback" not in r.stderr and "(sd –)" in r.stdout, r.stderr[-2000:]
    # trait-data over an earlier output with another seed
    rows = [{"set": "extract", "side": side, "instruction_id": 0, "question_id": q, "sample_id": 0,
             "question": f"q{q}", "answer": f"{side} {q}"} for q in range(4) for side in ("pos", "neg")]
    (tmp_path / "r").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "r" / "judged.parquet")
    ok = cli("trait-data", tmp_path / "r", "--out", tmp_path / "td", "--seed", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in (tmp_path / "td").glob("*.json*")}
    fails(cli("trait-data", tmp_path / "r", "--out", tmp_path / "td", "--seed", "2"), "seed was 1, now 2")
    assert {p.name: p.read_bytes() for p in (tmp_path / "td").glob("*.json*")} == before and len(before) == 8


def test_demo_checks_its_layer_before_any_work(tmp_path, model_dir):
    fails(cli("demo", "--layer", "9", "--model", model_dir, "--out", tmp_path / "runs"),
          "--layer 9 is out of range", "layers 0..2")
    assert not (tmp_path / "runs").exists()


def test_a_chat_on_a_terminal_goes_on_past_a_blank_line_until_quit(model_dir, vector):
    import pty
    import select
    import time

    pid, fd = pty.fork()  # a terminal: the chat reads with input(), as a user typing
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "personavec.cli", "chat", "--vector", str(vector), "--layer",
                                   "1", "--model", str(model_dir), "--max-new-tokens", "2"],
                  {**os.environ, "HF_HUB_OFFLINE": "1"})
    out = b""

    def read_until_prompt(start: int, seconds: float = 120) -> None:
        nonlocal out
        end = time.time() + seconds
        while time.time() < end and not out[start:].endswith(b"you> "):
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:  # the chat ended
                    return

    for line in (b"Hi?\r", b"\r", b"Why?\r", b"/quit\r"):
        read_until_prompt(len(out))
        os.write(fd, line)
        out += b"\n"  # a prompt before this point is not the next one
    read_until_prompt(len(out), 30)
    _, status = os.waitpid(pid, 0)
    text = out.decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0 and "Traceback" not in text, text[-2000:]
    assert text.count("| steered (evil x 1 (raw units))") == 2, text[-2000:]  # Hi? and Why?, the blank line between


@pytest.mark.parametrize("message", [
    "argument --units: invalid choice: 'foo' (choose from 'raw', 'norm')",  # Python up to 3.12.7
    "argument --units: invalid choice: 'foo' (choose from raw, norm)",  # 3.12.8 and 3.13.1 on: choices bare
])
def test_argparse_choice_lines_show_values_as_typed_on_every_python(message):
    from personavec.cli.common import _as_typed_usage

    assert _as_typed_usage(message) == "argument --units: invalid choice: foo (choose from raw, norm)"
    assert _as_typed_usage("argument --layer: invalid int value: 'x'") == "argument --layer: x is not a whole number"
