"""python -m bench: the training and generation benchmark (bench/speed.py)."""
import sys

from bench.speed import main

if __name__ == "__main__":  # not in the spawned workers, which import this module as __mp_main__
    sys.argv[0] = "python -m bench"
    main()
