#!/usr/bin/env python
"""Supervised (pre)training of a backbone, dense or ACDC, on a whole dataset: see ``fewshot/cli/pretrain.py``."""

from fewshot.cli.pretrain import main

if __name__ == "__main__":
    main()
