"""Real model servers for the backend tests: venvs from committed locks, start, stop, calls."""
