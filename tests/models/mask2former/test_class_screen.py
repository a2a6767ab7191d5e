"""The class screen: the pixels it settles get the exact best class; its bound never undercuts a class."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from segscope.models.mask2former.class_screen import class_screen, screen, weak_bound


def _class_probs(queries: int, classes: int, confident: int, seed: int) -> Tensor:
    """``[Q,C]``: softmax over C+1 of random logits ("no object" dropped), ``confident`` queries sure of one class."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(queries, classes + 1, generator=generator)
    sure = torch.randperm(queries, generator=generator)[:confident]
    logits[sure, torch.randint(classes, (confident,), generator=generator)] += 8.0
    return logits.softmax(-1)[:, :-1]


def _mask_probs(pixels: int, queries: int, seed: int) -> Tensor:
    """``[n,Q]`` mask probabilities of many kinds: white noise, all equal, 0/1 extremes, one query on."""
    generator = torch.Generator().manual_seed(seed)
    noise = (3 * torch.randn(pixels, queries, generator=generator)).sigmoid()
    equal = torch.rand(pixels, 1, generator=generator).expand(-1, queries)
    extremes = (torch.rand(pixels, queries, generator=generator) > 0.5).float()
    one_on = torch.eye(queries)[torch.randint(queries, (pixels,), generator=generator)]
    return torch.cat([noise, equal, extremes, one_on, torch.zeros(1, queries)]).contiguous()


def _screened(class_probs: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Labels ``[n]``, confidence ``[n]``, the pixels left ``[u]`` and the screen's weak classes."""
    labels = torch.full((len(pixels),), -1, dtype=torch.int64)
    confidence = torch.full((len(pixels),), -1.0)
    classes = class_screen(class_probs)
    rest = screen(classes, pixels, labels, confidence)
    weak = torch.ones(class_probs.shape[1], dtype=torch.bool)
    weak[classes.strong] = False
    return labels, confidence, rest, weak


@pytest.mark.parametrize("confident", [0, 3, 10])
@pytest.mark.parametrize("classes", [20, 133])
def test_settled_pixels_get_the_first_best_class_and_its_share(confident: int, classes: int) -> None:
    class_probs = _class_probs(60, classes, confident, seed=classes + confident)
    pixels = _mask_probs(2000, 60, seed=confident)
    labels, confidence, rest, weak = _screened(class_probs, pixels)
    scores = pixels.double() @ class_probs.double()  # [n,C], exact enough to rank
    settled = torch.ones(len(pixels), dtype=torch.bool)
    settled[rest] = False
    best = scores.amax(1)
    if weak.any():
        assert bool((scores[settled][:, weak].amax(1) < best[settled] * (1 - 1e-6)).all()), "a weak class near the best"
    top2 = scores.topk(2, dim=1).values
    clear = settled & (top2[:, 0] - top2[:, 1] > 1e-6 * top2[:, 0])  # strong classes tied to rounding: either
    assert torch.equal(labels[clear], scores.argmax(1)[clear])
    share = best / scores.sum(1).clamp_min(1e-12)
    torch.testing.assert_close(confidence[settled], share[settled].float(), rtol=1e-6, atol=1e-7)
    assert rest.tolist() == sorted(set(rest.tolist()))


def test_a_few_sure_queries_settle_most_noise_pixels() -> None:
    """The case the screen is for: 10 of 100 queries sure of a class, white-noise masks, 133 classes."""
    class_probs = _class_probs(100, 133, 10, seed=1)
    generator = torch.Generator().manual_seed(2)
    pixels = (3 * torch.randn(20000, 100, generator=generator)).sigmoid()
    _, _, rest, _ = _screened(class_probs, pixels)
    assert len(rest) < 0.1 * len(pixels)


def test_a_weak_class_that_wins_is_never_settled() -> None:
    """Fourteen strong classes (one sure query each) and a weak class that every other query
    favours a little: at pixels where only those queries are on, the weak class wins, so the
    screen must leave them; where a sure query is on, it settles them."""
    queries, classes = 40, 30
    logits = torch.zeros(queries, classes + 1)
    logits[torch.arange(14), torch.arange(14)] = 9.0
    logits[14:, 20] = 2.0
    class_probs = logits.softmax(-1)[:, :-1]
    weak_on = torch.zeros(50, queries)
    weak_on[:, 14:] = torch.linspace(0.5, 1.0, 50)[:, None]
    strong_on = torch.zeros(50, queries)
    strong_on[torch.arange(50), torch.arange(50) % 14] = 1.0
    labels, _, rest, _ = _screened(class_probs, torch.cat([weak_on, strong_on]))
    assert rest.tolist() == list(range(50))
    assert labels[50:].tolist() == [k % 14 for k in range(50)]


def test_every_class_strong_settles_every_pixel() -> None:
    class_probs = _class_probs(12, 9, 3, seed=0)
    pixels = _mask_probs(300, 12, seed=0)
    labels, _, rest, weak = _screened(class_probs, pixels)
    assert len(rest) == 0 and not weak.any()
    scores = pixels.double() @ class_probs.double()
    top2 = scores.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-6 * top2[:, 0]
    assert torch.equal(labels[clear], scores.argmax(1)[clear])


def test_the_front_holds_every_weak_classs_best_combination() -> None:
    """For any mean m >= 0 and deviation r >= 0, the best of ``m * A_c + r * B_c`` over the front
    equals the best over every class that is not strong."""
    class_probs = _class_probs(50, 90, 6, seed=3)
    classes = class_screen(class_probs)
    weak = [c for c in range(90) if c not in set(classes.strong.tolist())]
    sums = class_probs[:, weak].sum(0).double()
    spreads = (class_probs[:, weak] - class_probs[:, weak].mean(0)).norm(dim=0).double()
    weights = torch.rand(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights[:2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    every = (weights @ torch.stack([sums, spreads])).amax(1)
    front = (weights @ classes.front.double()).amax(1)
    torch.testing.assert_close(front, every, rtol=1e-6, atol=0)
    assert classes.front.shape[1] < len(weak)


def test_the_weak_bound_holds_everywhere_and_is_tight_where_cauchy_schwarz_is() -> None:
    """Over pixels of every kind the bound is at least every weak class's score. One weak class
    leads the rest in both sum and spread (the front is that class alone); at pixels whose
    deviation from their mean lies along that class's own (``s = m + a (P_c - p_c)``) the bound
    equals its score, so a looser or a tighter bound fails here."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(60, 51, generator=generator)
    logits[torch.arange(8), torch.arange(8)] += 8.0  # classes 0-7: sure queries, strong
    logits[8::2, 30] += 2.0  # class 30: the leading weak class
    class_probs = logits.softmax(-1)[:, :-1]
    classes = class_screen(class_probs, strong=8)
    assert classes.strong.tolist() == list(range(8)) and classes.front.shape == (2, 1)
    weak = class_probs[:, 8:]
    deviation = class_probs[:, 30] - class_probs[:, 30].mean()
    aligned = 0.5 + torch.linspace(0.1, 0.4, 5)[:, None] * deviation / deviation.abs().max()
    pixels = torch.cat([_mask_probs(1000, 60, seed=5), aligned])
    bound = weak_bound(classes, pixels, pixels.sum(1)).double()
    scores = (pixels.double() @ weak.double()).amax(1)
    assert bool((bound >= scores * (1 - 1e-6)).all())
    # Equal but for the slack that keeps the computed deviation above its float rounding.
    torch.testing.assert_close(bound[-5:], scores[-5:], rtol=1e-3, atol=0)
