"""Write a Hugging Face model card (README.md + adapter files + recipe) for one finished run.

    python tools/model_card.py runs/neat/dtd --out model_cards/neat/dtd [--push-to-hub USER/REPO] [--index]
    python tools/model_card.py --index            # only refresh the list of cards in model_cards/README.md

--push-to-hub uploads the card folder with huggingface_hub (needs network and a token, e.g. HF_TOKEN).
"""

from __future__ import annotations

import argparse
import sys

from petl_zoo.cards import push_card, write_card, write_index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "run_dir", nargs="?", help="a finished run folder (result.json, adapter files, config.json)"
    )
    p.add_argument("--out", help="card folder to write")
    p.add_argument("--template", default=None, help="Jinja card template (default: model_cards/TEMPLATE.md)")
    p.add_argument(
        "--push-to-hub", default=None, metavar="REPO", help="upload the card folder to this Hub repo"
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    p.add_argument("--index", action="store_true", help="refresh the card list in <cards-root>/README.md")
    p.add_argument("--cards-root", default="model_cards", help="folder whose README.md lists the cards")
    args = p.parse_args(argv)
    if args.run_dir is None and not args.index:
        p.error("give a run folder and --out, or --index")
    if args.run_dir is not None and not args.out:
        p.error("--out is required with a run folder (e.g. --out model_cards/neat/dtd)")
    try:
        if args.run_dir is not None:
            readme = write_card(args.run_dir, args.out, args.template)
            print(f"wrote {readme}")
        if args.index:
            print(f"updated {write_index(args.cards_root)}")
    except ValueError as e:
        p.error(str(e))
    if args.push_to_hub:
        if args.run_dir is None:
            p.error("--push-to-hub needs a run folder and --out")
        print(f"pushed: {push_card(args.out, args.push_to_hub, private=args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
