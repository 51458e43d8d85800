"""Preset metadata: what each preset reproduces, in the terms of the "Which Dice is this?" table.

Every preset function is decorated with :func:`_register`, which attaches its :class:`PresetInfo` as
``fn.info`` and adds it to :data:`PRESETS`, or, for a compound loss (Dice plus a pixel loss, whose
``PresetInfo.pixel_loss`` names it), to :data:`COMPOUND_PRESETS`; the table lists both, in
:data:`TABLE_ORDER`.  :func:`~dicetorch.presets.identify` looks for losses of the Dice family, functions
of the per-class sums alone, so it matches :data:`PRESETS` only.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Equivalent:
    """The dicetorch loss that reproduces a preset's default configuration.

    ``cls`` is a class name in :mod:`dicetorch` and ``kwargs`` its arguments; ``adapt`` says how the
    preset's inputs become (N, C, *spatial) for it; ``offset`` is added to its value; ``when`` states
    the condition under which the two agree (empty: always); ``exact=False`` marks a close but not
    exact match (``when`` says what differs); ``preset_args`` are the preset's required arguments and
    ``preset_kwargs`` the keywords of the configuration compared (e.g. MONAI's ``softmax=True``).
    """

    cls: str
    kwargs: dict
    adapt: str = ""
    offset: float = 0.0
    when: str = ""
    exact: bool = True
    preset_args: tuple = ()
    preset_kwargs: dict = dataclasses.field(default_factory=dict)

    def call(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        text = f"`dt.{self.cls}({args})`"
        if self.adapt:
            text += f" on {self.adapt}"
        if self.offset:
            text += f" {'+' if self.offset > 0 else '-'} {abs(self.offset):g}"
        return text

    def describe(self, preset: str) -> str:
        """The table cell."""
        args = [*map(repr, self.preset_args), *(f"{k}={v!r}" for k, v in self.preset_kwargs.items())]
        head = f"for `{preset}({', '.join(args)})`: " if args else ""
        if not self.exact:
            return f"{head}close, not exact: {self.call()} ({self.when})"
        return f"{head}exact{' when ' + self.when if self.when else ''}: {self.call()}"


@dataclasses.dataclass(frozen=True)
class PresetInfo:
    """What a preset reproduces, in the terms of the table (all for its default arguments)."""

    name: str
    original: str
    source: str
    call: str
    activation: str
    denominator: str
    smoothing: str
    weights: str
    absent: str
    sums: str
    loss: str
    equivalent: Equivalent
    pixel_loss: str = ""  # a compound loss: the pixel loss added to the Dice (empty for a Dice loss)


PRESETS: dict = {}
COMPOUND_PRESETS: dict = {}


def _register(info: PresetInfo):
    def deco(fn):
        fn.info = info
        (COMPOUND_PRESETS if info.pixel_loss else PRESETS)[info.name] = fn
        return fn

    return deco


# the order of the table's rows (the modules register in import order, grouped by library)
TABLE_ORDER = (
    "matlab", "monai_dice", "monai_generalized_dice", "monai_tversky", "smp_dice", "smp_tversky",
    "nnunet_soft_dice", "kornia_dice", "keras_dice", "vnet", "tf_dice", "mxnet_dice",
    "keras_generalized_dice_seed", "keras_generalized_dice_fixed",
    "monai_dice_ce", "monai_dice_focal", "monai_generalized_dice_focal", "nnunet_dc_and_ce", "nnunet_dc_and_bce",
)


def _sort_presets() -> None:
    """Put :data:`PRESETS` and :data:`COMPOUND_PRESETS` in table order (names outside
    :data:`TABLE_ORDER` last, as registered)."""
    rank = {name: i for i, name in enumerate(TABLE_ORDER)}
    for registry in (PRESETS, COMPOUND_PRESETS):
        items = sorted(registry.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        registry.clear()
        registry.update(items)


def all_presets() -> dict:
    """Every registered preset, the Dice losses first, then the compound losses (the table's rows)."""
    return {**PRESETS, **COMPOUND_PRESETS}
