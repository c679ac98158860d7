"""What a session reports: the terminal summary, Markdown, the machine-readable result, shard merge."""
