"""Unsteered sampling on an OpenAI-compatible server that serves the same weights (vLLM, SGLang, the llama.cpp
server): the official code's fast path for the contrastive answers.

:class:`EndpointSampler` answers :class:`~personavec.engine.decoder.Request` objects like the local engine does
(same ``generate`` interface, answers yielded as they finish, at most ``concurrency`` requests in flight), from
each request's chat ``messages``. Steering cannot travel to a stock server: a request with edits is refused, unless
``edit_body`` turns edits into request fields the server applies (a vLLM server with personavec's plugin:
:class:`PluginEdits`, below).
Activations are always computed locally from the returned text. :meth:`EndpointSampler.check_same_model` asks
the server for a greedy answer to a fixed probe and compares it with the local model's, so a server serving
another model is refused before any answer is sampled.
"""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch
from tqdm.auto import tqdm

from ..endpoint import ChatClient, EndpointConfig
from ..errors import PersonavecError
from ..model.edits import Edit
from ..model.loading import LoadedModel
from ..vectors.vector import PersonaVector
from .decoder import Request, Result

PROBE = "Count from one to ten in words, separated by commas."
PROBE_TOKENS = 24


def parse_sampler(spec: str) -> str | None:
    """The served model's name of an ``openai:MODEL`` spec; None for ``local``."""
    kind, _, model = spec.partition(":")
    if kind == "local" and not model:
        return None
    if kind != "openai" or not model:
        raise PersonavecError(f"unknown sampler {spec!r}; use local or openai:MODEL (with --sampler-base-url)")
    return model


class EndpointSampler:
    def __init__(self, model: str, base_url: str | None = None, concurrency: int = 16,
                 edit_body: Callable[[Sequence[Edit]], dict[str, Any]] | None = None) -> None:
        self.client = ChatClient(EndpointConfig.from_env(model=model, base_url=base_url), label="sampler endpoint",
                                 hint="--sampler-base-url or OPENAI_BASE_URL")
        self.concurrency = max(1, int(concurrency))
        self.edit_body = edit_body  # a request's edits -> the request fields that carry them (None: refused)

    def with_edits(self, edit_body: Callable[[Sequence[Edit]], dict[str, Any]]) -> EndpointSampler:
        """The same endpoint, sending each request's edits as ``edit_body`` makes them."""
        other = copy.copy(self)
        other.edit_body = edit_body
        return other

    @property
    def name(self) -> str:
        return f"openai:{self.client.config.model}@{self.client.config.base_url}"

    def complete(self, request: Request) -> Result:
        if request.edits and self.edit_body is None:
            raise PersonavecError("a steered request cannot be sampled on an endpoint; steered stages run locally")
        if not request.messages:
            raise PersonavecError("endpoint sampling needs each request's chat messages")
        params: dict[str, Any] = {"max_tokens": request.max_new_tokens, "temperature": request.temperature,
                                  "seed": request.seed}
        if request.temperature > 0:
            params["top_p"] = request.top_p
        if request.edits:
            params["extra_body"] = self.edit_body(request.edits)
        data = self.client.chat([dict(m) for m in request.messages], **params)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise PersonavecError(f"{self.client.where} returned no choices[0].message; check that it is an "
                                  "OpenAI-compatible chat-completions API") from None
        n = int((data.get("usage") or {}).get("completion_tokens") or 0)
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Result(request.key, request, [], text.strip(), finish, n_generated=n)

    def generate(self, requests: Iterable[Request], progress: bool | str = False, total: int | None = None,
                 initial: int = 0) -> Iterator[Result]:
        """Answers in the order they finish; the first error stops the stream once the requests in flight end."""
        todo = list(requests)
        desc = progress if isinstance(progress, str) else "sampling (endpoint)"
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="personavec-sampler") as pool, \
                tqdm(total=total or len(todo), initial=initial, desc=desc, unit="answer", disable=not progress) as bar:
            pending: set[Future] = set()
            queue = iter(todo)
            error: BaseException | None = None
            while True:
                while error is None and len(pending) < self.concurrency:
                    req = next(queue, None)
                    if req is None:
                        break
                    pending.add(pool.submit(self.complete, req))
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut.exception() is not None:
                        error = error or fut.exception()
                        continue
                    bar.update(1)
                    yield fut.result()
            if error is not None:
                raise error

    def check_same_model(self, lm: LoadedModel, edits: Sequence[Edit] = ()) -> None:
        """Refuse a server whose greedy answer to a fixed probe differs from the local model's (with ``edits``: a
        steered probe, which the server must steer as the local engine does)."""
        from .sampling import SamplingConfig, generate

        probe = Request("", PROBE_TOKENS, edits=tuple(edits), messages=({"role": "user", "content": PROBE},),
                        key="probe")
        served = self.complete(probe).text
        cfg = SamplingConfig(n_samples=1, temperature=0.0, max_new_tokens=PROBE_TOKENS)
        local = generate(lm, [lm.format_chat(PROBE)], cfg, seeds=[0], edits=[tuple(edits)])[0]["answer"]
        if served == local:
            return
        if edits:
            raise PersonavecError(
                f"{self.client.where} steers differently from the local engine: its steered greedy answer to a "
                f"probe differs ({served[:40]!r} vs {local[:40]!r}); serve the same weights in float32, or sample "
                "steered answers locally (--sampler local); --no-sampler-check skips this check")
        raise PersonavecError(
            f"{self.client.where} does not serve {lm.model_id}: its greedy answer to a probe differs from the "
            f"local model's ({served[:40]!r} vs {local[:40]!r}); serve the same weights (and chat template), "
            "or sample locally (--sampler local); --no-sampler-check skips this check (for a server that runs the "
            "same weights at another precision)")


def vllm_xargs(persona: dict | None = None, key: str | None = None) -> dict[str, Any]:
    """A request's ``vllm_xargs`` for personavec's vLLM plugin: ``persona`` (sent as a JSON string: vLLM's field
    carries no nested objects) and ``key``, the key its readings are fetched under. With the ``openai`` client:
    ``extra_body={"vllm_xargs": vllm_xargs(persona, key)}``. The prefix-cache salt is the server's to add."""
    out: dict[str, Any] = {}
    if persona is not None:
        out["persona"] = json.dumps(persona, allow_nan=False)
    if key is not None:
        out["persona_key"] = key
    return out


HINT = "start vLLM with the personavec plugin serving it (docs/vllm.md)"


class NoPlugin(PersonavecError):
    """The server has no personavec plugin, or does not serve the vector asked for (steered answers can still be
    sampled locally)."""


class PluginEdits:
    """Edits along ``vectors`` (by the names the server serves them under) as vLLM plugin requests.

    ``base_url``: the server's OpenAI base URL (``http://HOST:PORT/v1``). The constructor runs the preflight and
    refuses, in one line, a server without the plugin or one serving another vector under a name (or none)."""

    def __init__(self, base_url: str, vectors: dict[str, PersonaVector], api_key: str | None = None,
                 timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.vectors = dict(vectors)
        listing = self._listing(api_key, timeout)
        served = {v.get("name"): v for v in listing.get("vectors", []) if isinstance(v, dict)}
        for name, vec in self.vectors.items():
            entry = served.get(name)
            if entry is None:
                raise NoPlugin(f"the vLLM server at {self.base_url} serves no vector named {name!r} (it "
                               f"serves {', '.join(map(str, served)) or 'none'}); {HINT}")
            if entry.get("digest") != vec.digest():
                raise PersonavecError(f"the vLLM server at {self.base_url} serves another vector under the name "
                                      f"{name!r} (digest {entry.get('digest')} there, {vec.digest()} here); "
                                      f"serve this run's vector file")
        self.layers = set(listing.get("layers") or [])
        self.max_coef = float(listing.get("max_coef") or float("inf"))

    def _listing(self, api_key: str | None, timeout: float) -> dict[str, Any]:
        url = f"{self.base_url}/persona/vectors"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                data = json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise PersonavecError(f"{url} refused the API key ({e.code}); pass the server's key "
                                      "(OPENAI_API_KEY)") from None
            raise NoPlugin(f"{url} answered {e.code}: the server has no personavec plugin, or none "
                           f"configured; {HINT}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise PersonavecError(f"cannot reach {url} ({getattr(e, 'reason', e)}); start the server or fix "
                                  "--sampler-base-url") from None
        except json.JSONDecodeError:
            raise NoPlugin(f"{url} did not answer JSON: the server has no personavec plugin; {HINT}") from None
        if not isinstance(data, dict) or data.get("plugin") != "personavec":
            raise NoPlugin(f"{url} is not the personavec plugin's listing; {HINT}")
        return data

    def entry(self, e: Edit) -> dict[str, Any]:
        """The ``persona.edits`` entry that makes the server apply exactly ``e``."""
        name = next((n for n, vec in self.vectors.items()
                     if torch.equal(vec.get(e.layer).float(), e.direction.float())), None)
        if name is None:
            raise PersonavecError(f"an edit at layer {e.layer} is not along a vector served by {self.base_url}; only "
                                  f"{', '.join(self.vectors)} can be sent there")
        if self.layers and e.layer not in self.layers:
            raise PersonavecError(f"the vLLM server at {self.base_url} has no hooks at layer {e.layer}; start it with "
                                  "that layer in personavec.layers")
        if e.kind != "ablate" and abs(e.coef) > self.max_coef:
            raise PersonavecError(f"an edit at layer {e.layer} has coefficient {e.coef:g} (raw units), beyond the "
                                  f"server's bound of {self.max_coef:g}; steer with a smaller one or locally")
        if e.kind == "add":
            return {"kind": "add", "vector": name, "coef": float(e.coef), "units": "raw", "layer": e.layer,
                    "positions": e.positions}
        entry = {"kind": e.kind, "vector": name, "layers": [e.layer], "positions": e.positions}
        return {**entry, "max": float(e.coef)} if e.kind == "cap" else entry

    def fits(self, edits: Sequence[Edit]) -> str | None:
        """None when the server can apply every one of ``edits``; otherwise why not (one line)."""
        for e in edits:
            try:
                self.entry(e)
            except PersonavecError as err:
                return str(err)
        return None

    def __call__(self, edits: Sequence[Edit]) -> dict[str, Any]:
        """The request fields (``extra_body``) that carry ``edits``."""
        return {"vllm_xargs": vllm_xargs({"edits": [self.entry(e) for e in edits]})}
