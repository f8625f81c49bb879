"""``python -m fewshot.analysis``: see :mod:`fewshot.analysis.cli`."""

from fewshot.analysis.cli import main

if __name__ == "__main__":
    main()
