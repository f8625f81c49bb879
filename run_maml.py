#!/usr/bin/env python
"""Meta-train MAML on an (ACDC) backbone and evaluate it on seeded test episodes.

Example: python run_maml.py --backbone resnet18 --acdc net --ways 5 --shots 1
"""

from fewshot.cli import main

if __name__ == "__main__":
    main(method="maml")
