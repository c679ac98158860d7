"""Golden files: where they live, how they are read, compared and (only on request) written.

One concern per module:

- ``layout``: the golden tree (``<model>/<device-class>/<variant>/<suite>/<check>.json``, the
  model-level ``<model>/tokenizer/<suite>/<check>.json``), the sidecar next to each golden, and
  the guards that keep reads and writes inside the golden folder;
- ``files``: the one JSON serialization, atomic writes (temp file + rename) and write errors
  that say what to do, and the temporary files a killed write leaves;
- ``sidecars``: the ``.meta.json`` provenance records (not compared, shown on failure), whether
  one still vouches for its golden, and the end-of-session report on the tree;
- ``owners``: which suite file owns a suite name's golden folder, across runs;
- ``mismatch``: what a failure says when the kind's own explanation cannot (a damaged layout);
- ``store``: ``GoldenStore``, which reads, compares and (with ``--snapshot-update``) writes.

Which names may become a path component is ``harness.suites.names``' rule, shared with suites,
checks and the registry. The names below are re-exported so ``from harness.golden import X``
keeps working.
"""

from __future__ import annotations

from harness.golden.files import (
    atomic_write, dumps, leftover_temp_files, normalize, remove_leftover_temp_files, sha256_text, write_error,
)
from harness.golden.layout import (
    TOKENIZER_SCOPE, SuiteNames, contained, golden_path, meta_path, nearest_class, overlap_problem,
)
from harness.golden.mismatch import Explain, describe_difference, explained, shape_problem
from harness.golden.owners import OWNER_KEY, SuiteOwners
from harness.golden.sidecars import (
    SHA_KEY, judged_record, orphan_sidecars, provenance_lines, remove_orphan_sidecars, sidecar_problem, stale_sidecars, tree_report,
    trust_problem,
)
from harness.golden.store import GoldenStore, Judge
from harness.suites.names import META_SUFFIX, SAFE_NAME, check_id_problem, name_problem

__all__ = [
    "META_SUFFIX", "OWNER_KEY", "SAFE_NAME", "SHA_KEY", "SuiteOwners", "TOKENIZER_SCOPE", "Explain", "GoldenStore", "Judge", "SuiteNames",
    "atomic_write", "check_id_problem", "contained", "describe_difference", "dumps", "explained", "golden_path", "judged_record",
    "leftover_temp_files", "meta_path", "name_problem", "nearest_class", "normalize", "overlap_problem",
    "provenance_lines", "remove_leftover_temp_files", "sha256_text", "shape_problem", "sidecar_problem",
    "stale_sidecars", "tree_report", "write_error", "orphan_sidecars", "remove_orphan_sidecars", "trust_problem",
]
