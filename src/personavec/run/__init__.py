"""The pipeline of `personavec run`: settings, artifacts, stages over a run directory, and the report."""
