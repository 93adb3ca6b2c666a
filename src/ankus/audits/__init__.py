"""Audits of what a model has learned: memorization, reverse-LM elicitation, linear directions, moments."""
