"""The pytest run: options, the session, collection, shards, threads, the machine it ran on, reference mode."""
