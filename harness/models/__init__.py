"""Models: the registry, where files come from, variants, the pool that loads them, 4-bit layers."""
