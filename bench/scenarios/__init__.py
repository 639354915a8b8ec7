"""The scenarios of issues 4 and 12, in the order the runner plays them (each adds rows)."""
