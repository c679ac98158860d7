"""Heavy benchmark suites: collected only when ``bench/`` (or a file in it) is named.

``pytest`` or ``pytest suites/`` stay fast for CI; run these on purpose::

    pytest bench/suites/ --benchmark-json=bench.json
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        target = (base / arg.split("::", 1)[0]).resolve()
        if target == HERE or HERE in target.parents:
            return None
    return True
