"""Model internals, owned here alone: loading, chat templates, the layer convention and hooks (capture, edits),
pooled activations and projections. Uses nothing of personavec but files and errors."""
