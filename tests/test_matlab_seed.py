"""The MATLAB ``dicePixelClassificationLayer`` (the seed document) against GeneralizedDiceLoss.

``forwardLoss`` and ``backwardLoss`` are transcribed line by line, in MATLAB's H x W x K x N layout,
and compared with ``GeneralizedDiceLoss(activation="none", squared=True, smooth_nr=1e-8,
smooth_dr=1e-8, weighting="square")`` on the (N, K, H, W) permutation: same loss, and the
hand-written dL/dY equals autograd of our loss with respect to the probabilities.  Everything is
float64, so the two differ only in summation order (rtol 1e-10).
"""
from __future__ import annotations

import pytest
import torch

import dicetorch as dt

EPSILON = 1e-8  # properties(Constant) Epsilon = 1e-8
TOL = dict(rtol=1e-10, atol=1e-13)


def _sum(a, dim):
    """MATLAB sum(a, dim) (1-based dim), keeping the summed dimension as MATLAB does."""
    return a.sum(dim - 1, keepdim=True)


def forward_loss(Y, T, W=None):
    """loss = forwardLoss(layer, Y, T); Y, T are H x W x K x N."""
    if W is None:
        W = 1 / _sum(_sum(T, 1), 2) ** 2  # W = 1 ./ sum(sum(T,1),2).^2;
    intersection = _sum(_sum(Y * T, 1), 2)  # intersection = sum(sum(Y.*T,1),2);
    union = _sum(_sum(Y**2 + T**2, 1), 2)  # union = sum(sum(Y.^2 + T.^2, 1),2);
    numer = 2 * _sum(W * intersection, 3) + EPSILON  # numer = 2*sum(W.*intersection,3) + layer.Epsilon;
    denom = _sum(W * union, 3) + EPSILON  # denom = sum(W.*union,3) + layer.Epsilon;
    dice = numer / denom  # dice = numer./denom;
    N = Y.shape[3]  # N = size(Y,4);
    return (1 - dice).sum() / N  # loss = sum((1-dice))/N;  (dice is 1x1x1xN: sums over N)


def backward_loss(Y, T, W=None):
    """dLdY = backwardLoss(layer, Y, T); H x W x K x N."""
    if W is None:
        W = 1 / _sum(_sum(T, 1), 2) ** 2
    intersection = _sum(_sum(Y * T, 1), 2)
    union = _sum(_sum(Y**2 + T**2, 1), 2)
    numer = 2 * _sum(W * intersection, 3) + EPSILON
    denom = _sum(W * union, 3) + EPSILON
    N = Y.shape[3]
    return (2 * W * Y * numer / denom**2 - 2 * W * T / denom) / N  # dLdY = (...)./N;


def _data(seed, n=3, k=2, h=32, w=32, all_present=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n, h, w), generator=g)
    if all_present:
        labels[:, 0, :k] = torch.arange(k)  # every class occurs in every image (MATLAB's W is inf otherwise)
    return logits, labels


def to_matlab(a):
    """(N, K, H, W) -> H x W x K x N."""
    return a.permute(2, 3, 1, 0)


def gdl(**kw):
    opts = dict(activation="none", squared=True, smooth_nr=EPSILON, smooth_dr=EPSILON, weighting="square")
    opts.update(kw)
    return dt.GeneralizedDiceLoss(**opts)


@pytest.mark.parametrize("target_kind", ["labels", "onehot"])
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("n,k", [(2, 2), (4, 2), (3, 4)])
def test_matlab_forward_and_backward(target_kind, backend, n, k):
    logits, labels = _data(n * 10 + k, n=n, k=k)
    probs = torch.softmax(logits, dim=1)  # the softmaxLayer in front of the loss layer
    onehot = torch.nn.functional.one_hot(labels, k).movedim(-1, 1).double()
    Y, T = to_matlab(probs), to_matlab(onehot)

    y = probs.clone().requires_grad_()
    target = labels if target_kind == "labels" else onehot
    loss = gdl(backend=backend)(y, target)
    loss.backward()

    torch.testing.assert_close(loss, forward_loss(Y, T), **TOL)
    torch.testing.assert_close(to_matlab(y.grad), backward_loss(Y, T), **TOL)
    # the hand-written backwardLoss is the derivative of forwardLoss (autograd of the transcription)
    Ya = Y.clone().requires_grad_()
    (g_matlab,) = torch.autograd.grad(forward_loss(Ya, T), Ya)
    torch.testing.assert_close(g_matlab, backward_loss(Y, T), **TOL)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_matlab_through_softmax(backend):
    """With our fused softmax, the logit gradient is the softmax layer's backward of MATLAB's dL/dY."""
    logits, labels = _data(5, n=2, k=3)
    probs = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).double()
    dldy = backward_loss(to_matlab(probs), to_matlab(onehot)).permute(3, 2, 0, 1)  # back to (N, K, H, W)
    dldz = probs * (dldy - (probs * dldy).sum(1, keepdim=True))  # softmax Jacobian-vector product

    z = logits.clone().requires_grad_()
    loss = gdl(activation="softmax", backend=backend)(z, labels)
    loss.backward()
    torch.testing.assert_close(loss, forward_loss(to_matlab(probs), to_matlab(onehot)), **TOL)
    torch.testing.assert_close(z.grad, dldz, **TOL)


def test_absent_class_matlab_nan_vs_absent_weight():
    """A class missing from an image: MATLAB's W = 1/0^2 = inf makes its loss NaN.

    Ours stays finite: absent_weight="max" gives the absent class the largest weight of the present
    classes of that image (MONAI's rule), "zero" drops it; each equals the MATLAB formula with that W.
    """
    logits, labels = _data(6, n=2, k=3)
    labels[1] = torch.where(labels[1] == 2, torch.zeros_like(labels[1]), labels[1])  # class 2 absent in image 1
    probs = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).double()
    Y, T = to_matlab(probs), to_matlab(onehot)

    assert torch.isnan(forward_loss(Y, T))

    W = 1 / _sum(_sum(T, 1), 2) ** 2  # 1 x 1 x K x N, inf at (k=2, n=1)
    assert torch.isinf(W[0, 0, 2, 1]) and torch.isfinite(W[0, 0, :, 0]).all()
    finite = torch.where(torch.isinf(W), torch.zeros_like(W), W)
    w_max = torch.where(torch.isinf(W), finite.amax(dim=2, keepdim=True), W)
    w_zero = finite

    for policy, w in (("max", w_max), ("zero", w_zero)):
        y = probs.clone().requires_grad_()
        loss = gdl(absent_weight=policy, backend="reference")(y, labels)
        loss.backward()
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, forward_loss(Y, T, W=w), **TOL)
        torch.testing.assert_close(to_matlab(y.grad), backward_loss(Y, T, W=w), **TOL)
