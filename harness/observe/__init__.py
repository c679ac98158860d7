"""Observing a model: prompts turned into inputs, and greedy generations scored step by step."""
