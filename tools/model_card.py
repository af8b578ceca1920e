"""Write a Hugging Face model card (README.md + adapter files + recipe) for one finished run.

    python tools/model_card.py runs/neat/dtd --out model_cards/neat/dtd [--push-to-hub USER/REPO]

--push-to-hub uploads the card folder with huggingface_hub (needs network and a token, e.g. HF_TOKEN).
"""

from __future__ import annotations

import argparse
import sys

from petl_zoo.cards import push_card, write_card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished run folder (result.json, adapter files, config.json)")
    p.add_argument("--out", required=True, help="card folder to write")
    p.add_argument("--template", default=None, help="Jinja card template (default: model_cards/TEMPLATE.md)")
    p.add_argument(
        "--push-to-hub", default=None, metavar="REPO", help="upload the card folder to this Hub repo"
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    args = p.parse_args(argv)
    try:
        readme = write_card(args.run_dir, args.out, args.template)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {readme}")
    if args.push_to_hub:
        print(f"pushed: {push_card(args.out, args.push_to_hub, private=args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
