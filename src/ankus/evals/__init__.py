"""Evaluations that run on any causal LM ankus loads."""
