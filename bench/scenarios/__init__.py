"""The benchmark scenarios, in the order the runner plays them (each adds rows)."""
