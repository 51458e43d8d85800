"""``python -m dicetorch.presets``: write or check the generated "Which Dice is this?" pages."""
from __future__ import annotations

import argparse
import sys

from .table import DOC_PATH, README_PATH, readme_with_table, which_dice_markdown


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicetorch.presets", description=sys.modules[__package__].__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print docs/which_dice.md to stdout")
    group.add_argument("--write", action="store_true", help=f"write {DOC_PATH} and the table in README.md")
    group.add_argument("--check", action="store_true", help="exit 1 if either file is stale")
    args = parser.parse_args(argv)
    text = which_dice_markdown()
    if args.markdown:
        sys.stdout.write(text)
        return 0
    readme = README_PATH.read_text(encoding="utf-8")
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text, encoding="utf-8")
        README_PATH.write_text(readme_with_table(readme), encoding="utf-8")
        return 0
    current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
    stale = [p for p, ok in ((DOC_PATH, current == text), (README_PATH, readme == readme_with_table(readme))) if not ok]
    for path in stale:
        print(f"{path} is stale: run `python -m dicetorch.presets --write`", file=sys.stderr)
    return 1 if stale else 0
