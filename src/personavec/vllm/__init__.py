"""personavec inside vLLM: a plugin (no fork) that steers, ablates, caps and reads persona vectors per request.

``pip install personavec[vllm]`` beside vLLM; start the server with ``VLLM_PLUGINS=personavec`` and
``--additional-config '{"personavec": {"vectors": ["evil=PATH@13"]}}'``; send ``persona`` in ``vllm_xargs``
(:func:`vllm_xargs` makes the field; :class:`PluginEdits` checks a server and turns edits into requests).
See docs/vllm.md. Rooms: :mod:`.slots` (the hook maths, torch only), :mod:`.spec` (configuration and requests),
:mod:`.hooks` (the worker side), :mod:`.plugin` (where it takes hold of vLLM), :mod:`.routes` (HTTP).
"""

from ..engine.remote import NoPlugin, PluginEdits, vllm_xargs

__all__ = ["NoPlugin", "PluginEdits", "vllm_xargs"]
