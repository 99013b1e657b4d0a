"""The one on-disk key-value cache: SQLite (WAL mode), JSON values, safe across threads and processes.

Behind the judge's score cache and the base answers of ΔP screening. Keys are strings (callers hash what
identifies an entry); values are anything JSON holds, ``None`` included (a judge's *missing* score is worth
remembering too). Writes are committed at once, so a killed process keeps everything it stored.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import PersonavecError

_CHUNK = 500  # keys per SELECT ... IN (...), well under SQLite's variable limit


def digest(*parts: Any) -> str:
    """A cache key: sha256 over the JSON of ``parts`` (so the pieces cannot run into each other)."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=True, default=str).encode("ascii")).hexdigest()


class KeyValueCache:
    """``get_many`` / ``put_many`` over one table of an SQLite file; ``what`` names it in error messages."""

    def __init__(self, path: str | Path, table: str, what: str = "cache", timeout: float = 60.0) -> None:
        if not table.isidentifier():
            raise ValueError(f"table name {table!r} is not an identifier")
        self.path, self.table, self.what = Path(path), table, what
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(path), timeout=timeout, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS {table} "
                               "(key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)")
            self._conn.commit()
        except (sqlite3.Error, OSError) as exc:
            raise PersonavecError(f"cannot open the {what} {path} ({exc}); delete the file if it is corrupt, or "
                                  "point the cache elsewhere (PERSONAVEC_CACHE)") from None
        self._lock = threading.Lock()

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The cached values of ``keys`` that are present."""
        unique = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        with self._lock:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start:start + _CHUNK]
                rows = self._conn.execute(f"SELECT key, value FROM {self.table} WHERE key IN "
                                          f"({','.join('?' * len(chunk))})", chunk).fetchall()
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put_many(self, items: Mapping[str, Any]) -> None:
        """Store (or overwrite) values, committed at once."""
        now = time.time()
        rows = [(k, json.dumps(v, ensure_ascii=False), now) for k, v in items.items()]
        if not rows:
            return
        with self._lock, self._conn:
            self._conn.executemany(f"INSERT OR REPLACE INTO {self.table} (key, value, created) VALUES (?, ?, ?)",
                                   rows)

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> KeyValueCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KeyValueCache({str(self.path)!r}, {self.table!r})"
