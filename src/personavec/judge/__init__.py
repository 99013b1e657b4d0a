"""LLM judges: scores 0..100 from the probabilities of one answer token, cached on disk."""
