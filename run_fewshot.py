#!/usr/bin/env python
"""Train and evaluate any few-shot method (maml, protonet, matchingnet, relationnet, baseline,
baseline_pp) on the same backbones and the same seeded test episodes.

Example: python run_fewshot.py --method protonet --backbone resnet10 --acdc net --ways 5 --shots 5
"""

from fewshot.cli import main

if __name__ == "__main__":
    main()
