"""Suite files: the spec, YAML loading, validation, the names goldens may use, the reference and schema."""
