"""Standalone reproductions of upstream defects the harness reports as platform findings.

Each module imports only torch, transformers, peft and bitsandbytes (never the harness), so
it can be attached to an upstream bug report as it is.
"""
