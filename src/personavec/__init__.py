"""personavec: persona vectors for chat language models."""

from __future__ import annotations

from .errors import PersonavecError
from .files import read_table
from .model.activations import POOLINGS, PooledMeans, encode_pairs, pooled_means
from .model.edits import add_vector
from .model.layers import capture, decoder_layers, edit
from .model.loading import DEFAULT_MODEL, LoadedModel, load_model, wrap_model
from .vectors.extraction import extract_vector
from .vectors.formats import (
    export_control_vector_gguf,
    from_control_vector_gguf,
    import_official,
    read_control_vector_gguf,
)
from .vectors.tables import FilterConfig, paired_filter
from .vectors.vector import PersonaVector
from .version import __version__

__all__ = [
    "DEFAULT_MODEL", "POOLINGS", "FilterConfig", "LoadedModel", "PersonaVector", "PersonavecError",
    "PooledMeans", "__version__", "add_vector", "capture", "decoder_layers", "edit", "encode_pairs",
    "export_control_vector_gguf", "extract_vector", "from_control_vector_gguf", "import_official",
    "load_model", "paired_filter", "pooled_means", "read_control_vector_gguf", "read_table", "wrap_model",
]
