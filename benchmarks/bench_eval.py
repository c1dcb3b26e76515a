"""Eval forward time, throughput and peak memory: plain, deployed, and at batch 1 deployed and loaded
from a packed file: ``python benchmarks/bench_eval.py [--quick] [options]``.

The same as ``python benchmarks/bench.py eval``; see ``bench.py`` for the options.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(['eval'] + sys.argv[1:]))
