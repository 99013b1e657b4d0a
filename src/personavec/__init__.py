"""personavec: persona vectors for chat language models."""

from __future__ import annotations

__version__ = "0.1.0"

from .activations import POOLINGS, PooledMeans, encode_pairs, pooled_means
from .errors import PersonavecError
from .extract import extract_vector
from .files import read_table
from .internals import capture, decoder_layers, edit
from .models import DEFAULT_MODEL, LoadedModel, load_model, wrap_model
from .steering import add_vector
from .tables import FilterConfig, paired_filter
from .vectors import (
    PersonaVector,
    export_control_vector_gguf,
    from_control_vector_gguf,
    import_official,
    read_control_vector_gguf,
)

__all__ = [
    "DEFAULT_MODEL", "POOLINGS", "FilterConfig", "LoadedModel", "PersonaVector", "PersonavecError",
    "PooledMeans", "__version__", "add_vector", "capture", "decoder_layers", "edit", "encode_pairs",
    "export_control_vector_gguf", "extract_vector", "from_control_vector_gguf", "import_official",
    "load_model", "paired_filter", "pooled_means", "read_control_vector_gguf", "read_table", "wrap_model",
]
