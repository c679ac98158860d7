"""Behaviour tests for Hugging Face causal language models, as a pytest plugin.

YAML suites under ``suites/`` declare checks; the plugin runs each check against
the model in every variant (fp16, NF4, each with a LoRA adapter) and compares
the observations with golden files or budgets.
"""

from __future__ import annotations

__version__ = "0.1.0"
