"""The scenarios of issue 4, in the order the runner plays them (each adds rows to the table)."""
