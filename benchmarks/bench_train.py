"""Training-step time and peak memory, eager, with gradient checkpointing and compiled: ``python benchmarks/bench_train.py [--quick] [options]``.

The same as ``python benchmarks/bench.py train``; see ``bench.py`` for the options.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main(['train'] + sys.argv[1:]))
