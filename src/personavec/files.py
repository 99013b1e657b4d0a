"""Every file personavec writes, and the tables and JSON it reads, go through this module.

* :func:`atomic_write` / :func:`atomic_path` / :func:`atomic_dir` — the one atomic writer: a temporary file (or
  directory) with a unique name in the target's directory, flushed and fsynced, given the normal permissions
  (``0666`` / ``0777`` less the umask, not ``mkstemp``'s ``0600``), then renamed over the target; removed when
  anything fails, so a reader sees the old file or the new one, never half of one.
* :func:`append_jsonl` / :func:`read_jsonl` — resumable logs: rows are appended whole (one write, fsynced), and
  a torn last line left by a killed writer is dropped on reading (:func:`repair_jsonl` cuts it off the file).
* :func:`claim_settings` — the settings that define a directory's outputs, recorded once and compared on every
  later call; a mismatch is refused with the settings that differ named.
* :func:`locked` — one process at a time per output directory (or file): a second one gets "in use by PID …".
* :func:`check_writable` — fail before computing, not after, when an output cannot be written.
* :func:`read_table` / :func:`write_table` / :func:`write_json` — CSV, JSONL and Parquet tables; JSON documents.

One module on purpose (about 500 lines): every file the project writes goes through it, so there is exactly one
place to get atomicity, permissions, locking and torn-line handling right.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import PersonavecError

if TYPE_CHECKING:  # pandas is imported where a table is read or written: the vLLM plugin loads vectors without it
    import pandas as pd

TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path, kind: str = "file") -> Path:
    if kind == "dir":
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for a library that writes by file name; renamed over ``path`` when the
    block ends without error (fsynced first), removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """An open file whose content replaces ``path`` atomically when the block ends without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files with mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
        yield f
        f.flush()


def _normal_modes(root: Path) -> None:
    """``root`` and everything in it given the normal permissions (``0777`` / ``0666`` less the umask; executables
    stay executable): libraries that write into a directory may create files ``0600`` (safetensors does)."""
    os.chmod(root, 0o777 & ~_UMASK)
    for dirpath, dirnames, filenames in os.walk(root):  # a link is left alone: chmod would change its target
        for name in dirnames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), 0o777 & ~_UMASK)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not os.path.islink(p):
                os.chmod(p, (0o777 if st.st_mode & 0o100 else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """A temporary directory next to ``path``; on success it replaces ``path`` (an older one is removed first,
    or, with ``replace=False``, kept: another process made the same directory meanwhile)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "dir")
    try:
        yield tmp
        _normal_modes(tmp)
        if path.exists() and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
        elif path.exists():
            old = _temp_name(path, "dir")
            old.rmdir()
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def _finite_json(obj: Any, where: str = "") -> None:
    """Raise when ``obj`` holds a NaN or infinite float (JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise PersonavecError(f"setting {where or 'value'} is {obj}, which is not a finite number")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite_json(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite_json(v, f"{where}[{i}]")


def to_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, ensure_ascii=False, default=str)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """A JSON document, atomically (non-finite numbers are written as Python's json reads them back)."""
    return write_text(path, to_json(obj) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PersonavecError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PersonavecError(f"{path} is not valid JSON ({e}); delete it and run the command again") from None


# --------------------------------------------------------------------------------------------- JSONL logs


def append_text(f: IO[str], text: str) -> None:
    """Append whole lines to an open log in one write, flushed and fsynced (a kill leaves at most a torn tail)."""
    if text:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


_LINE_ENDS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def escape_line_ends(json_text: str) -> str:
    """JSON text with the characters that some readers take for line ends (U+2028, U+2029, U+0085; valid raw
    inside JSON strings) escaped, so a JSONL row is one line for every reader."""
    return json_text.translate(_LINE_ENDS)


def jsonl_line(row: Any) -> str:
    """One JSONL line: UTF-8 JSON (see :func:`escape_line_ends`)."""
    return escape_line_ends(json.dumps(row, ensure_ascii=False, default=str)) + "\n"


def append_jsonl(f: IO[str], rows: Iterable[dict[str, Any]]) -> None:
    """Append whole rows to an open JSONL log (see :func:`append_text`)."""
    append_text(f, "".join(jsonl_line(r) for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL log; a torn last line (no newline, or not JSON) ends the read."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def repair_jsonl(path: str | os.PathLike) -> int:
    """Cut a torn last line off a JSONL log; returns the number of complete lines kept."""
    path = Path(path)
    if not path.exists():
        return 0
    good = size = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            good += 1
            size += len(line)
    if size != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())
    return good


def rewrite_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_write(path) as f:
        for r in rows:
            f.write(jsonl_line(r))


# --------------------------------------------------------------------------------------------- settings claims


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{where}.{k}" if where else str(k)
            if k not in old:
                out.append(f"{sub} is new ({_short(new[k])})")
            elif k not in new:
                out.append(f"{sub} is gone (was {_short(old[k])})")
            else:
                out += _differences(old[k], new[k], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and old and isinstance(old[0], dict):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{where}[{i}]")]
    if old != new:
        return [f"{where or 'settings'} was {_short(old)}, now {_short(new)}"]
    return []


def _short(x: Any, limit: int = 60) -> str:
    text = json.dumps(x, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def normalize_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists, …); non-finite numbers are refused."""
    _finite_json(settings)
    return json.loads(json.dumps(settings, default=str))


def settings_conflict(path: str | os.PathLike, settings: dict[str, Any], key: str | None = None) -> list[str]:
    """The differences between the settings recorded at ``path`` (under ``key``) and ``settings`` (empty: none,
    or nothing recorded yet)."""
    path = Path(path)
    if not path.exists():
        return []
    recorded = read_json(path)
    if key is not None:
        recorded = recorded.get(key) if isinstance(recorded, dict) else None
    return _differences(recorded, normalize_settings(settings))


def refuse_other_settings(path: str | os.PathLike, settings: dict[str, Any], what: str,
                          todo: str = "use another --out, or delete it to start over", key: str | None = None,
                          where: str | os.PathLike | None = None) -> None:
    """Raise (writing nothing) when ``path`` records settings other than ``settings``."""
    diff = settings_conflict(path, settings, key)
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise PersonavecError(f"{where or Path(path).parent} holds {what} with other settings ({shown}); {todo}")


def claim_settings(path: str | os.PathLike, settings: dict[str, Any], what: str,
                   todo: str = "use another --out, or delete it to start over", key: str | None = None,
                   extra: dict[str, Any] | None = None, where: str | os.PathLike | None = None) -> None:
    """Record the settings that define a directory's outputs (first call), or refuse different ones later.

    ``what`` names the outputs in the refusal ("<where> holds <what> with other settings (…)"; ``where`` defaults to
    the directory of ``path``). With ``key`` the settings are stored under that key and ``extra`` (versions, dates:
    not compared) beside them.
    """
    refuse_other_settings(path, settings, what, todo, key, where)
    if not Path(path).exists():
        settings = normalize_settings(settings)
        write_json(path, settings if key is None else {key: settings, **(extra or {})})


def fingerprint(path: str | os.PathLike, span: int = 1 << 20) -> dict[str, Any]:
    """An input file's identity: its name, size and a hash of its first and last MiB (cheap on huge files,
    unchanged by copying or touching)."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            h.update(f.read(span))
    return {"name": path.name, "size": size, "head_tail_sha256": h.hexdigest()[:16]}


# --------------------------------------------------------------------------------------------- locks

_held: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, depth): a process may re-enter its own lock
_held_lock = threading.Lock()


@contextlib.contextmanager
def locked(target: str | os.PathLike, what: str = "the output", is_dir: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on an output directory (or, with ``is_dir=False``, an output file) for the block.

    A second process is refused with the PID that holds it; the operating system releases the lock when its
    holder dies, even by SIGKILL. The same process may enter its own lock again (nested stages).
    """
    target = Path(target)
    if is_dir:
        target.mkdir(parents=True, exist_ok=True)
        lock = target / ".personavec.lock"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = target.with_name(f".{target.name}.lock")
    lock = lock.resolve()
    with _held_lock:
        if lock in _held:
            fd, depth = _held[lock]
            _held[lock] = (fd, depth + 1)
        else:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise PersonavecError(f"{target} is in use by {holder}; wait for it to finish, or write {what} "
                                      "somewhere else")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {' '.join(sys.argv[:3])}\n".encode(), 0)
            _held[lock] = (fd, 1)
            if is_dir:  # ours alone now: temporary files left by a writer that was killed can go
                for stale in target.rglob(".*.tmp"):
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)
    try:
        yield
    finally:
        with _held_lock:
            fd, depth = _held[lock]
            if depth > 1:
                _held[lock] = (fd, depth - 1)
            else:
                del _held[lock]
                _unlock(fd)
                os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:
        import msvcrt

        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    pid, _, cmd = text.partition(" ")
    if not pid.isdigit():
        return "another process"
    return f"PID {pid}" + (f" ({Path(cmd.split()[0]).name} {' '.join(cmd.split()[1:])})".rstrip() if cmd else "")


# --------------------------------------------------------------------------------------------- checks


def check_writable(path: str | os.PathLike) -> Path:
    """Make sure ``path`` (a file to be written) can be created, before any work is spent on its content."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(path)
        tmp.unlink()
    except OSError as e:
        raise PersonavecError(f"cannot write {path}: {e.strerror or e}; choose a writable place") from None
    if path.is_dir():
        raise PersonavecError(f"{path} is a directory; give a file name")
    return path


# --------------------------------------------------------------------------------------------- tables


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV, JSONL (one object per line) or Parquet table with a clear error on bad input."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise PersonavecError(f"table {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"prompt": str, "answer": str})
        if suffix in (".jsonl", ".json"):
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise PersonavecError(f"{path}:{n}: malformed JSON ({e.msg}); "
                                                  "expected one JSON object per line") from None
                        if not isinstance(obj, dict):
                            raise PersonavecError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                        rows.append(obj)
            return pd.DataFrame(rows)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except PersonavecError:
        raise
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        raise PersonavecError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    raise PersonavecError(f"{path}: unsupported table type {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")


def iter_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Fixed-size chunks of a JSONL / JSON-lines, Parquet or CSV file, streamed."""
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
            yield batch.to_pandas()
    elif suffix == ".csv":
        yield from pd.read_csv(path, chunksize=chunk_rows, keep_default_na=False, na_values=[""])
    elif suffix in (".jsonl", ".json"):
        buf: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    buf.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PersonavecError(f"{path}:{n}: malformed JSON ({e.msg})") from None
                if len(buf) == chunk_rows:
                    yield pd.DataFrame(buf)
                    buf = []
        if buf:
            yield pd.DataFrame(buf)
    else:
        read_table(path)  # raises the unsupported-type error


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table atomically (type from the suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise PersonavecError(f"unsupported table type {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            text = df.to_json(orient="records", lines=True, force_ascii=False, default_handler=str)
            Path(tmp).write_text(escape_line_ends(text), encoding="utf-8")
    return path


def save_figure(fig: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """A matplotlib figure as PNG, atomically."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", **savefig)
    return Path(path)
