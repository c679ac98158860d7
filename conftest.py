"""Project-local pytest settings for this repository (the plugin itself is harness.plugin).

`pytest .` should collect suites and the harness's own tests, not YAML under
fixtures/, docs/ or the CI workflow folder.
"""

collect_ignore_glob = ["fixtures/*", "docs/*", ".github/*", "bench-out/*"]
