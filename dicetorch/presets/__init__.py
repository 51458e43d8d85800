"""Presets: the Dice losses of well-known libraries, papers and posts, reproduced on one operator.

"Which Dice is this?"  Every implementation below is a ratio of the same per-class sums ::

    I = sum_m p*t          P = sum_m p^q          T = sum_m t^q          (q = 2 if squared)

and they differ only in the activation, the power q, where the smoothing goes, the class weights,
what happens to a class absent from the target, whether sums run per image or over the batch, and
the sign.  Each function here returns an ``nn.Module`` that takes the original's constructor
arguments and its calling convention (argument order, layout, target type) and returns the same
loss value and input gradient; the sums come from :func:`dicetorch.ops.dice_stats` (one fused pass,
``backend="auto"`` unless a ``backend`` keyword says otherwise).  ``docs/which_dice.md`` tabulates
them; regenerate it with ``python -m dicetorch.presets --write``.

Conventions shared by all presets:

* **Precision.**  Sums are accumulated as :func:`~dicetorch.ops.dice_stats` does (float32 for
  fp16/bf16/fp32 input, float64 for float64), and the loss is returned in that dtype, also where the
  original would sum in half precision.
* **Fused path.**  When the original's activation is softmax, sigmoid or none and its target is
  labels, a one-hot/soft float target or labels with an ignore value, the operator sees the raw
  input and nothing of size N*C*M is materialized besides the gradient.
* **Unfused path.**  Where the original applies something the operator does not fuse (a custom
  activation callable, a mask on a float target, a per-element ignore value, a loss mask), the preset
  applies it in PyTorch exactly as the original does and calls ``dice_stats(..., activation="none")``
  on the result: the sums still come from the operator.
* **Reference path.**  The "soft label" L1 formulation (MONAI ``soft_label=True``, smp) needs
  ``sum_m |p - t|``, which is not a function of (I, P, T) unless t is 0/1 and p lies in [0, 1] (then
  ``sum |p - t| = P + T - 2 I``).  The presets check this; when it does not hold they compute that one
  sum in PyTorch (the docstrings say where).

Compound losses (a Dice plus a cross-entropy or focal pixel loss: MONAI's ``DiceCELoss``,
``DiceFocalLoss``, ``GeneralizedDiceFocalLoss``, nnU-Net's ``DC_and_CE_loss``, ``DC_and_BCE_loss``)
are registered in :data:`COMPOUND_PRESETS`: where the original gives the Dice part and the pixel loss
the same activation, one operator call returns both parts' sums (the pixel rows of
:mod:`dicetorch.compound`); where it does not, each part is computed apart, still exactly.

For a loss that is not here, :func:`identify` finds its choices from its values and gradients, builds
the dicetorch loss (or the preset) that reproduces it and confirms that on fresh inputs
(``python -m dicetorch.presets identify module:attr`` from the command line).

Layout: one module per library reproduced (``matlab_layer``, ``monai``, ``smp``, ``nnunet``,
``kornia``, ``keras``, ``papers`` for the V-Net paper and the TensorFlow/MXNet posts), the metadata
in ``_registry``, the generated pages in ``table``, the command line in ``_cli``; ``identification``
with ``_probe`` (crafted inputs, per-class gradients), ``_fit`` and ``_families`` (the model fits),
``_describe``, ``_build`` and ``_match`` (the presets an identified loss equals).
"""
from __future__ import annotations

from __future__ import annotations

from ._registry import COMPOUND_PRESETS, PRESETS, Equivalent, PresetInfo, _sort_presets
from .matlab_layer import matlab
from .monai import (monai_dice, monai_dice_ce, monai_dice_focal, monai_generalized_dice,
                    monai_generalized_dice_focal, monai_tversky)
from .smp import smp_dice, smp_tversky
from .nnunet import nnunet_dc_and_bce, nnunet_dc_and_ce, nnunet_soft_dice
from .kornia import kornia_dice
from .keras import keras_dice, keras_generalized_dice_fixed, keras_generalized_dice_seed
from .papers import mxnet_dice, tf_dice, vnet
from .table import (  # noqa: F401 - the generator's paths and markers, used by the staleness test
    DOC_PATH, README_BEGIN, README_END, README_PATH, readme_with_table, which_dice_markdown)
from .identification import Identification, identify
from ._cli import _main  # noqa: F401 - `python -m dicetorch.presets`

_sort_presets()

__all__ = [
    "Equivalent",
    "PresetInfo",
    "PRESETS",
    "COMPOUND_PRESETS",
    "matlab",
    "monai_dice",
    "monai_generalized_dice",
    "monai_tversky",
    "smp_dice",
    "smp_tversky",
    "nnunet_soft_dice",
    "kornia_dice",
    "keras_dice",
    "vnet",
    "tf_dice",
    "mxnet_dice",
    "keras_generalized_dice_seed",
    "keras_generalized_dice_fixed",
    "monai_dice_ce",
    "monai_dice_focal",
    "monai_generalized_dice_focal",
    "nnunet_dc_and_ce",
    "nnunet_dc_and_bce",
    "which_dice_markdown",
    "identify",
    "Identification",
]
