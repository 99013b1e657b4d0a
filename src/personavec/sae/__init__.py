"""Sparse autoencoders: the one SAE type and the field's formats, training one offline, and decomposing a persona
vector (and a screening score) into SAE features."""
