"""Imported once by forkrun's server: what every ``pytest`` run of a test project would import.

The libraries (torch, transformers with the Llama modules the embedded model needs, peft with its
bitsandbytes layers) and the harness itself are imported here (not the pytest plugins that load by
entry point: pytest wants to rewrite their asserts, and warns where they were imported before it),
then ``gc.freeze()`` moves them out of the collector's sight: a fork's
``gc.collect()`` (the pool calls it whenever it frees a variant) then walks its own objects, not
the millions of imported ones, and does not touch, and so copy, the server's pages.
Importing runs no operator, so OpenMP's pool is started in each fork, not here.
"""

import gc

import accelerate  # noqa: F401
import bitsandbytes  # noqa: F401
import peft  # noqa: F401
import peft.tuners.lora.bnb  # noqa: F401
import pydantic  # noqa: F401
import pytest  # noqa: F401
import pytest_benchmark.plugin  # noqa: F401
import safetensors.torch  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import transformers.integrations.bitsandbytes  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import yaml  # noqa: F401

import harness.checks  # noqa: F401
import harness.run.collect  # noqa: F401
import harness.plugin  # noqa: F401
import harness.models.pool  # noqa: F401
import harness.report.markdown  # noqa: F401
import harness.report.record  # noqa: F401
import harness.report.summary  # noqa: F401
import harness.report.result  # noqa: F401
import harness.run.session  # noqa: F401

gc.freeze()
