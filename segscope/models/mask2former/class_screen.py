"""Proving, pixel by pixel, that the best class is one of a few, without scoring the others.

A pixel's score for class ``c`` is ``s . P[:,c]``: its mask probabilities ``s [Q]`` against
the class's probabilities over the queries. Write ``m`` for the mean of ``s`` and ``P[:,c]``'s
mean ``p_c``; the cross terms of ``(m + (s - m)) . (p_c + (P[:,c] - p_c))`` vanish, so

    score_c = m * A_c + (s - m) . (P[:,c] - p_c)  <=  m * A_c + |s - m| * B_c

(Cauchy-Schwarz) with ``A_c`` the column's sum and ``B_c = |P[:,c] - p_c|``. Where a few
queries are sure of their class, the scores of those few "strong" classes are computed
exactly, and the bound, maximised over every other class, stays well below the best of them
at most pixels: there the best strong class is the answer, exactly, for the cost of a
product with a few columns. Maximising ``m * A + r * B`` over the other classes (``m, r >= 0``)
needs only those whose ``(A, B)`` no other class exceeds in both, usually one or two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from segscope.predictions import class_share

# Strong classes: with the mean and the sum columns, a product of 16 columns.
STRONG_CLASSES = 14
# The class columns of every semantic product are padded with zeros to a multiple of this:
# torch's CPU matmul of [n,100] x [100,N] ran at 142 GFLOP/s for N = 134 and 172 for N = 144,
# and over the 973k pixels of 800x1216 took 0.06-0.08 s for N = 2 to 9 but 0.023 s for N = 16
# (measured).
COLUMN_MULTIPLE = 16
# A bound within this fraction of the best strong score does not prove it: far above the
# float rounding of 100-term sums of non-negative terms (~1e-5), so a class the screen rules
# out was neither the best nor tied with it.
_MARGIN = 1e-4
# Relative slack on the computed ``|s|^2 - Q m^2`` (each float sum of 100 terms is off by at
# most ~6e-6 of ``|s|^2``): the computed deviation never falls short of the true one.
_DEVIATION_SLACK = 3e-5


class ClassScreen(NamedTuple):
    """What ``screen`` needs of one image's classes (see the module's docstring).

    ``columns [Q,K]``: the strong classes' probabilities, a column of ones (the pixel's sum of
    mask probabilities) and minus each query's class sum (the pixel's total score), then zeros.
    ``strong [S]``: the strong classes' ids, ascending. ``front [2,V]``: ``(A_c, B_c)`` of the
    other classes that no other exceeds in both (``V = 0`` when every class is strong).
    """

    columns: Tensor
    strong: Tensor
    front: Tensor


def class_screen(class_probs: Tensor, strong: int = STRONG_CLASSES) -> ClassScreen:
    """The screen of ``class_probs [Q,C]`` ("no object" dropped): its strong classes are the ``strong``
    with the highest probability under any one query (every class, when ``C <= strong``)."""
    num_queries, num_classes = class_probs.shape
    strong_classes = class_probs.amax(0).topk(min(strong, num_classes)).indices.sort().values
    ones, minus_sums = class_probs.new_ones(num_queries, 1), class_probs.sum(1, keepdim=True).neg()
    columns = pad_columns(torch.cat([class_probs[:, strong_classes], ones, minus_sums], 1))
    weak = torch.ones(num_classes, dtype=torch.bool, device=class_probs.device)
    weak[strong_classes] = False
    weak_probs = class_probs[:, weak]
    if weak_probs.shape[1] == 0:
        return ClassScreen(columns, strong_classes, class_probs.new_empty(2, 0))
    sums, spreads = weak_probs.sum(0), (weak_probs - weak_probs.mean(0)).norm(dim=0)
    # The front: by descending sum, each class whose spread exceeds every spread before it.
    order = sums.argsort(descending=True)
    spreads_in_order = spreads[order]
    earlier_best = torch.cat([spreads_in_order.new_full((1,), -1.0), spreads_in_order.cummax(0).values[:-1]])
    on_front = order[spreads_in_order > earlier_best]
    return ClassScreen(columns, strong_classes, torch.stack([sums[on_front], spreads[on_front]]))


def pad_columns(columns: Tensor) -> Tensor:
    """``columns [Q,N]`` then zero columns up to a multiple of ``COLUMN_MULTIPLE``."""
    return F.pad(columns, (0, -columns.shape[1] % COLUMN_MULTIPLE))


def screen(classes: ClassScreen, pixels: Tensor, labels: Tensor, confidence: Tensor) -> Tensor:
    """Writes the label and confidence of every pixel of ``pixels [n,Q]`` (mask probabilities)
    whose best class the screen proves to be strong into ``labels [n]`` and ``confidence [n]``;
    returns the indices ``[u]`` of the others, whose entries are left to the caller. Syncs once.
    """
    count = len(classes.strong)
    scores = pixels @ classes.columns  # [n,K]
    best, winner = scores[:, :count].max(-1)
    labels.copy_(classes.strong[winner])
    confidence.copy_(class_share(best, scores[:, count + 1].neg()))
    if classes.front.shape[1] == 0:
        return winner.new_empty(0)
    bound = weak_bound(classes, pixels, scores[:, count])
    return (bound >= best * (1 - _MARGIN)).nonzero()[:, 0]


def weak_bound(classes: ClassScreen, pixels: Tensor, totals: Tensor) -> Tensor:
    """``[n]``: at each pixel of ``pixels [n,Q]``, with ``totals [n]`` its summed mask probabilities,
    an upper bound on the score of every class that is not strong: ``m * A_c + |s - m| * B_c``
    at its largest over ``classes.front``, never below the exact value's float rounding."""
    num_queries = pixels.shape[1]
    mean = totals / num_queries
    squares = torch.linalg.vector_norm(pixels, dim=1).square_()
    deviation = (squares - num_queries * mean * mean + _DEVIATION_SLACK * squares).clamp_min_(0).sqrt_()
    return (torch.stack([mean, deviation], 1) @ classes.front).amax(1)
