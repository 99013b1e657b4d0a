"""Steering experiments: the grid of layers x coefficients, the choice of layer and strength, and the
multiple-choice capability check. (The edits themselves are model.edits.)"""
