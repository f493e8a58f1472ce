import os
import sys

# `pytest benchmarks` from the repo root: make `benchmarks` importable as a package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
