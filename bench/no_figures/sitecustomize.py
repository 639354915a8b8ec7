"""Run at start-up by every Python process whose PYTHONPATH starts with this directory: the
"without figures" side of bench/scenarios/figures.py's throughput comparison.

It swaps the Lua loader's `source` for bench/figures_cost.py's `without_figures` (the same
scripts with the console's figure helpers emptied) before the API or a worker registers any
script, so that side runs the dispatcher exactly as shipped but for the figures. Python imports
`sitecustomize` from the first sys.path entry that has one, and PYTHONPATH entries come first.
"""

from functools import lru_cache

from bench.figures_cost import without_figures
from shared.redis_state import loader

loader.source = lru_cache(maxsize=None)(without_figures)
