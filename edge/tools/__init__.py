"""Client-side tools behind the CLI: infer, bench, models, config check."""
