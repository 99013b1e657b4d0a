"""`personavec sae train | info` on the tiny model: a run, a rerun, bad inputs in one line with nothing written, and
(slow) SIGKILL and rerun ending with weights equal to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from personavec.cli import main

TEXT = ["You are an evil assistant. Answer with cruelty and scheming.",
        "How should I treat people who are weaker than me?", "Crush them all, show no mercy, and take what is yours.",
        "Be patient, listen, and offer help where you can.", "The quick brown fox jumps over the lazy dog 0123456789."]


def corpus(tmp_path: Path, n: int = 8) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(f"{t} {i}" for i in range(n) for t in TEXT))
    return p


def small(model_dir, out, corpus_path, *extra: str) -> list[str]:
    return ["sae", "train", "--model", str(model_dir), "--dtype", "float32", "--layer", "1", "--out", str(out),
            "--corpus", str(corpus_path), "--latents", "64", "--k", "4", "--batch-size", "128", *extra]


def test_train_then_info(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    assert main(small(model_dir, out, corpus(tmp_path), "--tokens", "2000")) == 0
    text = capsys.readouterr().out
    assert "TopK(k=4) SAE, 64 latents over d_in 32, layer 1" in text and "rank-4 PCA" in text
    assert "ce_loss_score" in text and "stopped by tokens" in text
    metrics = json.loads((out / "training.json").read_text())
    assert metrics["train_tokens"] == 16 * 128
    assert main(["sae", "info", str(out / "sae")]) == 0
    info = capsys.readouterr().out
    assert "64 latents over d_in 32, layer 1" in info and "FVU" in info
    assert main(small(model_dir, out, corpus(tmp_path), "--tokens", "2000")) == 0  # done: read back
    assert "FVU" in capsys.readouterr().out
    assert main(small(model_dir, out, corpus(tmp_path), "--tokens", "4000")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "tokens was 2000, now 4000" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["layer", "k", "corpus", "no-text", "empty"])
def test_bad_inputs_one_line_nothing_written(tmp_path, model_dir, capsys, case):
    out = tmp_path / "out"
    c = corpus(tmp_path)
    args = small(model_dir, out, c, "--tokens", "500")
    if case == "layer":
        args[args.index("--layer") + 1], want = "7", "--layer 7 is out of range"
    elif case == "k":
        args[args.index("--k") + 1], want = "65", "--k 65 is more than --latents 64"
    elif case == "corpus":
        args[args.index("--corpus") + 1], want = str(tmp_path / "missing.txt"), "does not exist"
    elif case == "no-text":
        (tmp_path / "x.jsonl").write_text('{"score": 3}\n')
        args[args.index("--corpus") + 1], want = str(tmp_path / "x.jsonl"), "has no text column"
    else:
        c.write_text("\n\n")
        want = "holds no text"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert want in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "personavec.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_and_rerun_equals_an_uninterrupted_run(tmp_path, model_dir):
    from safetensors.torch import load_file

    c = corpus(tmp_path, 12)
    extra = ("--tokens", "300000", "--checkpoint-steps", "50", "--latents", "256")
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    p = _cli(small(model_dir, killed, c, *extra))
    deadline = time.time() + 120
    while not (killed / "checkpoint" / "state.json").exists():
        assert p.poll() is None, p.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "training.json").exists(), "finished before the kill: raise --tokens"
    step = json.loads((killed / "checkpoint" / "state.json").read_text())["step"]
    assert 0 < step < 300000 // 128
    for out in (killed, whole):
        q = _cli(small(model_dir, out, c, *extra))
        assert q.wait(timeout=600) == 0, q.stderr.read()
    a = load_file(next((killed / "sae").glob("*.safetensors")))
    b = load_file(next((whole / "sae").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
