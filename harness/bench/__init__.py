"""``harness-bench``: the fp16-vs-NF4 comparison, and its shape sweep."""
