"""Persona vectors: the PersonaVector, its file formats, probes, and extraction from answer tables."""
