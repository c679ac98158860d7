"""Judging observations: the comparison engine, tolerances, allowances, noise, flips and budgets."""
