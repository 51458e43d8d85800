"""``python -m dicetorch.presets``: write or check the generated "Which Dice is this?" pages, or identify a loss.

    python -m dicetorch.presets --write | --check | --markdown
    python -m dicetorch.presets identify module:attr [--target labels|labels_1ch|onehot] [--num-classes 4] ...
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys

from .table import DOC_PATH, README_PATH, readme_with_table, which_dice_markdown


def _main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["identify"]:
        return _identify_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m dicetorch.presets", description=sys.modules[__package__].__doc__.splitlines()[0],
        epilog="`python -m dicetorch.presets identify --help`: find which Dice a loss computes")
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


def load_loss(spec: str):
    """The loss named by ``module:attr``: a loss callable, an nn.Module class or factory (called with no
    arguments), or an expression evaluated in the module, e.g. ``monai.losses:DiceLoss(softmax=True)``."""
    if ":" not in spec:
        raise ValueError(f"expected module:attr, got {spec!r}")
    module_name, expr = spec.split(":", 1)
    module = importlib.import_module(module_name)
    # an expression is the user's own code, from their command line
    obj = getattr(module, expr) if expr.isidentifier() else eval(expr, vars(module))  # noqa: S307
    if inspect.isclass(obj):
        return obj()
    import torch
    if not isinstance(obj, torch.nn.Module) and callable(obj):
        try:
            inspect.signature(obj).bind()
        except (TypeError, ValueError):
            return obj  # needs arguments: the loss itself
        made = obj()  # a factory such as dicetorch.presets.vnet
        if callable(made):
            return made
    return obj


def _identify_main(argv) -> int:
    import torch

    from .identification import identify
    parser = argparse.ArgumentParser(
        prog="python -m dicetorch.presets identify",
        description="Find which Dice loss a callable computes (its activation, smoothing, weights, reduction, ...), "
                    "the dicetorch loss that reproduces it and the presets it equals. Exit status 0 when exact.")
    parser.add_argument("loss", help="module:attr -- a loss function, an nn.Module class or factory (called with no "
                                     "arguments), or an expression such as 'monai.losses:DiceLoss(softmax=True)'")
    parser.add_argument("--target", default="labels", choices=("labels", "labels_1ch", "onehot"),
                        help="target form: labels (N, *spatial), labels_1ch (N, 1, *spatial), onehot (like the input)")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--spatial", type=int, nargs="+", default=[8, 8], help="image size of the probes")
    parser.add_argument("--layout", default="channels_first", choices=("channels_first", "channels_last", "matlab"))
    parser.add_argument("--target-first", action="store_true", help="the loss is called as loss(target, input)")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    args = parser.parse_args(argv)
    loss_fn = load_loss(args.loss)
    ident = identify(loss_fn, num_classes=args.num_classes, spatial=tuple(args.spatial), target=args.target,
                     layout=args.layout, target_first=args.target_first, dtype=getattr(torch, args.dtype))
    print(f"{args.loss} [{ident.convention.describe()}]")
    print(ident)
    return 0 if ident.exact else 1
