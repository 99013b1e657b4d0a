"""personavec: persona vectors for chat language models — extract, steer, monitor, fine-tune safely, screen data.

The stable public API (documented with runnable examples in docs/api.md)::

    import personavec as pv

    lm = pv.load_model("smollm2-135m")                       # or pv.wrap_model(hf_model, tokenizer)
    vec = pv.extract_vector(lm, "pos.jsonl", "neg.jsonl", trait="evil")
    with pv.steer(lm, pv.Edit.from_vector(vec, layer=12, coef=2.0)):
        print(pv.chat(lm, "What should I do with a wallet I found?"))
    table = pv.project(lm, conversations, {"evil": vec})

Names are imported on first use, so ``import personavec`` is quick and a command that fails early does not
pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import PersonavecError
from .version import __version__

#: public name -> the module that owns it
_API = {
    "load_model": "model.loading", "wrap_model": "model.loading", "LoadedModel": "model.loading",
    "Edit": "model.edits", "steer": "model.edits",
    "chat": "engine.sampling", "SamplingConfig": "engine.sampling",
    "PersonaVector": "vectors.vector", "load_vector": "vectors.formats", "extract_vector": "vectors.extraction",
    "FilterConfig": "vectors.tables",
    "make_judge": "judge.spec",
    "Run": "run.pipeline", "RunConfig": "run.config",
    "project": "monitor.projections", "LiveMonitor": "monitor.live",
    "finetune": "finetuning.lora", "TrainConfig": "finetuning.lora", "shift": "finetuning.shift",
    "screen": "screening.scoring", "ScreenConfig": "screening.scoring",
    "SparseAutoencoder": "sae.autoencoder", "load_sae": "sae.formats", "save_sae": "sae.formats",
    "train_sae": "sae.training", "SaeTrainConfig": "sae.training", "decompose": "sae.decomposition",
    "DecomposeConfig": "sae.decomposition",
}

__all__ = [
    "DecomposeConfig",
    "Edit",
    "FilterConfig",
    "LiveMonitor",
    "LoadedModel",
    "PersonaVector",
    "PersonavecError",
    "Run",
    "RunConfig",
    "SaeTrainConfig",
    "SamplingConfig",
    "ScreenConfig",
    "SparseAutoencoder",
    "TrainConfig",
    "__version__",
    "chat",
    "decompose",
    "extract_vector",
    "finetune",
    "load_model",
    "load_sae",
    "load_vector",
    "make_judge",
    "project",
    "save_sae",
    "screen",
    "shift",
    "steer",
    "train_sae",
    "wrap_model",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'personavec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .engine.sampling import SamplingConfig, chat
    from .finetuning.lora import TrainConfig, finetune
    from .finetuning.shift import shift
    from .judge.spec import make_judge
    from .model.edits import Edit, steer
    from .model.loading import LoadedModel, load_model, wrap_model
    from .monitor.live import LiveMonitor
    from .monitor.projections import project
    from .run.config import RunConfig
    from .run.pipeline import Run
    from .sae.autoencoder import SparseAutoencoder
    from .sae.decomposition import DecomposeConfig, decompose
    from .sae.formats import load_sae, save_sae
    from .sae.training import SaeTrainConfig, train_sae
    from .screening.scoring import ScreenConfig, screen
    from .vectors.extraction import extract_vector
    from .vectors.formats import load_vector
    from .vectors.tables import FilterConfig
    from .vectors.vector import PersonaVector
