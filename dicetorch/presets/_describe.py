"""What an identification says: the dicetorch loss and arguments, whether they exist, and the formula."""
from __future__ import annotations


def dicetorch_kwargs(ident):
    kw = dict(activation=ident.activation, smooth_nr=ident.smooth_nr, smooth_dr=ident.smooth_dr, batch=ident.batch,
              include_background=ident.include_background, reduction=ident.reduction)
    if ident.class_weights is not None:
        kw["class_weights"] = list(ident.class_weights)
    if ident.log_loss:
        kw["log_loss"] = True
    if ident.loss == "dice":
        return "DiceLoss", dict(kw, squared=ident.q == 2)
    if ident.loss == "tversky":
        return "TverskyLoss", dict(kw, alpha=ident.alpha, beta=ident.beta, gamma=ident.gamma)
    return "GeneralizedDiceLoss", dict(kw, squared=ident.q == 2, weighting=ident.weighting,
                                       absent_weight=ident.absent_weight)


def buildable(ident):
    """True, or why no dicetorch loss has these choices (a smoothing of -1e-12 is taken as 0)."""
    for k in ("smooth_nr", "smooth_dr"):
        v = getattr(ident, k)
        if v is not None and -1e-6 < v < 0:
            setattr(ident, k, 0.0)
    if ident.loss == "tversky" and ident.q == 2:
        return ("a Tversky/Jaccard ratio of squared sums (q = 2): dicetorch's TverskyLoss sums p and t linearly "
                "(only Dice has squared=True)")
    if ident.loss == "tversky" and ident.log_loss and ident.gamma != 1:
        return "-log of a focal Tversky index"
    if ident.loss == "generalized_dice":
        if ident.weighting not in ("square", "simple", "uniform"):
            return f"generalized Dice weights {ident.weighting}: dicetorch has 1/T^2, 1/T and 1"
        if ident.absent_weight not in ("max", "zero"):
            return (f"a class absent from the target gets weight {ident.absent_weight!r}; dicetorch gives it the "
                    "largest weight of the image ('max') or 0 ('zero')")
    for k in ("smooth_nr", "smooth_dr", "alpha", "beta"):
        v = getattr(ident, k)
        if v is not None and v < 0:
            return f"{k} = {v:g} < 0"
    if ident.gamma is not None and ident.gamma <= 0:
        return f"gamma = {ident.gamma:g}"
    return True


def _num(v: float) -> str:
    return f"{v:g}"


def formula(ident, c: int) -> str:
    """One readable line."""
    p = {"softmax": "softmax(x)", "sigmoid": "sigmoid(x)", "none": "x"}[ident.activation]
    sq = "²" if ident.q == 2 else ""
    plus = lambda v: f" + {_num(v)}" if v else ""  # noqa: E731
    k0 = 0 if ident.include_background else 1
    ks = f"k={k0}..{c - 1}"
    where = "the batch" if ident.batch else "image n"
    wk = "w_k·" if ident.class_weights is not None else ""
    if ident.loss == "generalized_dice":
        w = {"square": "1/T_k²", "simple": "1/T_k", "uniform": "1"}.get(ident.weighting, ident.weighting)
        if ident.class_weights is not None:
            w = f"c_k·{w}"
        r = f"(2 Σ_k w_k I_k{plus(ident.smooth_nr)}) / (Σ_k w_k (P_k + T_k){plus(ident.smooth_dr)})"
        term = f"−log {r}" if ident.log_loss else f"1 − {r}"
        red = {"mean": "mean_n" if not ident.batch else "", "sum": "sum_n" if not ident.batch else "",
               "none": "per image" if not ident.batch else ""}[ident.reduction]
        body = f"{red} [{term}]".strip() if red else f"{term}"
        absent = {"max": "; an absent class gets the image's largest w" if not ident.batch
                  else "; an absent class gets the largest w", "zero": "; an absent class gets w = 0"}.get(
            ident.absent_weight, f"; absent class: w = {ident.absent_weight}")
        extra = f", w_k = {w}{absent if ident.weighting != 'uniform' else ''}"
    else:
        if ident.loss == "dice":
            r = f"(2I{plus(ident.smooth_nr)}) / (P + T{plus(ident.smooth_dr)})"
        else:
            r = (f"(I{plus(ident.smooth_nr)}) / (I + {_num(ident.alpha)}(P − I) + {_num(ident.beta)}(T − I)"
                 f"{plus(ident.smooth_dr)})")
        if ident.log_loss:
            term = f"−log {r}"
        elif ident.gamma not in (None, 1.0):
            term = f"(1 − {r})^{_num(ident.gamma)}"
        else:
            term = f"1 − {r}"
        idx = ks if ident.batch else f"n, {ks}"
        red = {"mean": f"mean_{{{idx}}}", "sum": f"sum_{{{idx}}}", "none": f"per ({idx})"}[ident.reduction]
        body = f"{red} {wk}[{term}]"
        extra = ""
    if ident.scale != 1:
        body = f"{_num(ident.scale)} · {body}"
    if ident.offset:
        body = f"{body} {'+' if ident.offset > 0 else '−'} {_num(abs(ident.offset))}"
    classes = f", classes {ks}" if ident.loss == "generalized_dice" else ""
    return (f"loss = {body}{extra}; p = {p}, I = Σ p·t, P = Σ p{sq}, T = Σ t{sq} over the pixels of {where}"
            f"{classes}")
