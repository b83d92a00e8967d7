#!/usr/bin/env python
"""Run an unlearning hyperparameter search: ``python run_search.py --space search_spaces/sugd.yaml``.

A thin entry point for ``unlearn-search search``; ``--help`` lists every option.
"""

import sys

from unlearn_search.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
