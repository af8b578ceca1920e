#!/usr/bin/env python
"""Write a Hugging Face model card (README.md + adapter files + recipe) for one finished run.

    python tools/model_card.py runs/neat/dtd --out model_cards/neat/dtd [--push-to-hub USER/REPO] [--index]
    python tools/model_card.py --index            # only refresh the list of cards in model_cards/README.md

The same as ``petl-zoo card`` (see petl_zoo/cards.py).
"""

import sys

from petl_zoo.cards import main

if __name__ == "__main__":
    sys.exit(main(prog="tools/model_card.py"))
