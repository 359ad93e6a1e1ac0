"""EWC's Fisher diagonal: per-example squared gradients, averaged over a seeded sample of all the rows."""

from __future__ import annotations

import torch

from cmtl.continual.penalties import fisher_diagonal
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded

SPEC = TaskSpec("toy", labels=["a", "b"])


def _toy(n_per_class: int = 4):
    """Rows of class a hold token 1, rows of class b token 2, listed class by class (as a class-balanced buffer
    lists them); the model's weight column t gets a gradient only from rows holding token t."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(2, 3))
    ids = [[1, 1]] * n_per_class + [[2]] * n_per_class
    data = Encoded(ids, None, torch.tensor([0] * n_per_class + [1] * n_per_class))

    def forward(inputs):
        onehot = torch.nn.functional.one_hot(inputs["input_ids"], 3).float()
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return (onehot * mask).sum(1) / mask.sum(1) @ weight.T  # (B, 2)

    return forward, weight, data


def _fisher(forward, weight, data, **kwargs):
    (f,), (star,) = fisher_diagonal(forward, [weight], SPEC, data, pad_id=0, device=torch.device("cpu"), **kwargs)
    return f, star


def test_fisher_is_the_mean_of_each_examples_squared_gradient():
    forward, weight, data = _toy()
    f, star = _fisher(forward, weight, data, max_examples=100)
    by_hand = torch.zeros_like(weight)
    for i in range(len(data)):
        ids = torch.tensor([data.input_ids[i]])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        (g,) = torch.autograd.grad(SPEC.loss(forward(inputs), data.targets[i: i + 1]), [weight])
        by_hand += g ** 2 / len(data)
    # The squared gradient of whole batches would be smaller: the two classes' gradients cancel in part.
    assert torch.allclose(f, by_hand, atol=1e-7)
    assert torch.equal(star, weight.detach()) and star is not weight


def test_fisher_samples_every_row_not_the_first_ones():
    forward, weight, data = _toy()
    f, _ = _fisher(forward, weight, data, max_examples=4, seed=0)
    assert (f[:, 1] > 0).all() and (f[:, 2] > 0).all()  # both classes weighed, though the first 4 rows are all a
    again, _ = _fisher(forward, weight, data, max_examples=4, seed=0)
    assert torch.equal(f, again)  # seeded: the same sample every time
