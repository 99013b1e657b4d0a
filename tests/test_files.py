"""The one file module: atomic writes, JSONL logs, settings claims and directory locks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from personavec.errors import PersonavecError
from personavec.files import (
    append_jsonl,
    atomic_dir,
    atomic_write,
    claim_settings,
    locked,
    read_jsonl,
    repair_jsonl,
    rewrite_jsonl,
    write_json,
    write_table,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "personavec"


def _normal_mode(kind: str = "file") -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o666 if kind == "file" else 0o777) & ~mask


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temporary file left
    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == _normal_mode()  # not mkstemp's 0600


def test_atomic_dir_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError
    assert (target / "x").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with atomic_dir(target) as tmp:
        (tmp / "y").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    assert target.stat().st_mode & 0o777 == _normal_mode("dir")
    with atomic_dir(target, replace=False) as tmp:  # someone else made it meanwhile: theirs is kept
        (tmp / "z").write_text("4")
    assert sorted(p.name for p in target.iterdir()) == ["y"] and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_dir_gives_what_libraries_wrote_inside_it_the_normal_permissions(tmp_path):
    """Fine-tune checkpoints and adapters held ``0600`` files (safetensors writes them so) though the docs promise
    the umask."""
    from safetensors.torch import save_file

    with atomic_dir(tmp_path / "d") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "secret").write_text("x")
        os.chmod(tmp / "sub" / "secret", 0o600)
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "run.sh", 0o700)
    d = tmp_path / "d"
    assert (d / "w.safetensors").stat().st_mode & 0o777 == _normal_mode()
    assert (d / "sub" / "secret").stat().st_mode & 0o777 == _normal_mode()
    assert (d / "sub").stat().st_mode & 0o777 == _normal_mode("dir")
    assert (d / "run.sh").stat().st_mode & 0o777 == _normal_mode("dir")  # an executable stays executable



def test_atomic_dir_leaves_what_a_link_inside_it_points_to_as_it_was(tmp_path):
    """A link in the directory (to a folder or a file outside it) is not followed: its target keeps its mode."""
    outside, private = tmp_path / "outside", tmp_path / "private.txt"
    outside.mkdir(mode=0o700)
    os.chmod(outside, 0o700)
    private.write_text("x")
    os.chmod(private, 0o600)
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "folder").symlink_to(outside, target_is_directory=True)
        (tmp / "file").symlink_to(private)
    assert outside.stat().st_mode & 0o777 == 0o700 and private.stat().st_mode & 0o777 == 0o600

def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    """Fixed ``name.tmp`` names made two writers rename each other's temporary file away."""
    errors: list[BaseException] = []
    df = pd.DataFrame({"a": list(range(200))})

    def work(k: int) -> None:
        try:
            for _ in range(30):
                write_table(df.assign(k=k), tmp_path / "t.parquet")
                write_json(tmp_path / "t.json", {"k": k})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(pd.read_parquet(tmp_path / "t.parquet")) == 200 and json.loads((tmp_path / "t.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.parquet"]


def test_every_write_goes_through_the_file_module():
    """One atomic writer: no other module renames temporary files or writes outputs in place."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "files.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"os\.replace|\.replace\((tmp|path|target)\)|mkstemp|mkdtemp|\.tmp[\"']|savefig\(|"
                         r"\.write_text\(|open\([^)]*[\"']w[b]?[\"']", line):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_jsonl_log_drops_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    with open(log, "a", encoding="utf-8") as f:
        append_jsonl(f, [{"i": 0}, {"i": 1}])
        f.write('{"i": 2, "ans')  # a writer killed mid-line
    assert read_jsonl(log) == [{"i": 0}, {"i": 1}]
    assert repair_jsonl(log) == 2 and log.read_text().count("\n") == 2 and log.read_text().endswith("\n")


def test_jsonl_rows_stay_one_line_whatever_the_text(tmp_path):
    """Model output may hold U+2028, U+2029 or U+0085, which str.splitlines and many JSONL tools treat as line ends:
    every JSONL writer escapes them, so a row is one line for any reader."""
    rows = [{"answer": "a\u2028b\u2029c\x85d\ne\x1cf"}, {"answer": "ok"}]
    log = tmp_path / "log.jsonl"
    with open(log, "a", encoding="utf-8") as f:
        append_jsonl(f, rows)
    rewrite_jsonl(tmp_path / "whole.jsonl", rows)
    write_table(pd.DataFrame(rows), tmp_path / "table.jsonl")
    for path in (log, tmp_path / "whole.jsonl", tmp_path / "table.jsonl"):
        text = path.read_text(encoding="utf-8")
        assert [json.loads(x) for x in text.splitlines()] == rows == read_jsonl(path)


def test_claim_settings_names_what_differs(tmp_path):
    claim = tmp_path / "run.json"
    claim_settings(claim, {"dtype": "bfloat16", "sampling": {"seed": 0, "n": 2}}, "a run")
    claim_settings(claim, {"dtype": "bfloat16", "sampling": {"seed": 0, "n": 2}}, "a run")  # same: accepted
    with pytest.raises(PersonavecError) as e:
        claim_settings(claim, {"dtype": "float32", "sampling": {"seed": 1, "n": 2}}, "a run")
    msg = str(e.value)
    assert "dtype was \"bfloat16\", now \"float32\"" in msg and "sampling.seed was 0, now 1" in msg
    assert "\n" not in msg
    with pytest.raises(PersonavecError, match="not a finite number"):
        claim_settings(tmp_path / "other.json", {"coefs": [1.0, float("nan")]}, "a run")
    assert not (tmp_path / "other.json").exists()


HOLD = """
import sys, time
from personavec.files import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_process_is_refused_with_the_holders_pid_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(PersonavecError, match=rf"in use by PID {proc.pid}\b"), locked(out):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    t0 = time.time()
    with locked(out), locked(out):  # free again at once; re-entrant within one process
        assert time.time() - t0 < 5
    with locked(tmp_path / "table.jsonl", is_dir=False):
        assert (tmp_path / ".table.jsonl.lock").exists() and not (tmp_path / "table.jsonl").exists()
