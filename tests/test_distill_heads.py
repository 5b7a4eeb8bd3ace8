"""The linear probe's head: solved exactly, absorbing samples and their mirrors, summed over processes."""

import pytest
import torch

from smi_plugin import InversionConfig, SparseInverter
from smi_plugin.distill import LeastSquaresHead, forward_sparse, headless, linear_probe_student


def test_least_squares_head_is_the_ridge_solution_over_every_batch():
    torch.manual_seed(0)
    features, targets = torch.randn(50, 6) * torch.tensor([10.0, 3, 1, 0.1, 0.01, 1e-3]) + 2, torch.randn(50, 4)
    head = torch.nn.Linear(6, 4)
    solver = LeastSquaresHead(head, ridge=0.0)
    for rows in (slice(0, 7), slice(7, 30), slice(30, 50)):  # three batches of different sizes
        solver.accumulate(*solver.increments(features[rows], targets[rows]))
    solver.solve()
    design = torch.cat([features, torch.ones(50, 1)], 1).double()
    expected = torch.linalg.lstsq(design, targets.double()).solution  # the least-squares fit of all 50 rows
    assert torch.allclose(head.weight.double(), expected[:6].T, rtol=1e-3, atol=1e-4)
    assert torch.allclose(head.bias.double(), expected[6], rtol=1e-3, atol=1e-4)
    # A ridge shrinks the weights, never the bias: a huge one leaves the mean target.
    solver = LeastSquaresHead(head, ridge=1e9)
    solver.accumulate(*solver.increments(features, targets))
    solver.solve()
    assert head.weight.abs().max() < 1e-6 and torch.allclose(head.bias, targets.mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="probe_head='gradient'"):
        LeastSquaresHead(torch.nn.Sequential(torch.nn.Linear(6, 4)))


def test_headless_features_keep_the_input_order_of_mixed_kept_counts(tiny_vit):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 32, 32)
    mask = torch.rand(5, 8, 8) < torch.tensor([0.2, 0.9, 0.5, 0.9, 0.2]).view(5, 1, 1)  # different counts
    mask[:, 0, 0] = True
    with torch.no_grad(), headless(tiny_vit, tiny_vit.head):
        features = forward_sparse(tiny_vit, x, mask)
    assert isinstance(tiny_vit.head, torch.nn.Linear)  # restored
    with torch.no_grad():
        assert torch.allclose(tiny_vit.head(features), forward_sparse(tiny_vit, x, mask), atol=1e-5)


def test_absorb_adds_each_sample_and_its_mirror_and_sums_over_processes(tiny_vit):
    batch = SparseInverter(tiny_vit, InversionConfig(iterations=3, schedule="1:0.5"), progress=False).invert([0, 1, 2])
    student = linear_probe_student(tiny_vit, 10)
    solver = LeastSquaresHead(student.head)
    reduced = []

    def reduce(value):  # what another process would add: the same again
        reduced.append(value)
        return 2 * value

    solver.absorb(student, tiny_vit, batch, flip=True, reduce=reduce)
    assert solver.gram[-1, -1] == 2 * 2 * 3 and len(reduced) == 4  # 3 samples + mirrors, doubled; gram and cross
    x, m = batch.normalized(), batch.patch_mask
    with torch.no_grad(), headless(student, student.head):
        features = torch.cat([forward_sparse(student, x, m), forward_sparse(student, x.flip(-1), m.flip(-1))])
    with torch.no_grad():
        targets = torch.cat([forward_sparse(tiny_vit, x, m), forward_sparse(tiny_vit, x.flip(-1), m.flip(-1))])
    reference = LeastSquaresHead(torch.nn.Linear(features.shape[1], 10))
    reference.accumulate(*reference.increments(features, targets))
    assert torch.allclose(solver.gram, 2 * reference.gram) and torch.allclose(solver.cross, 2 * reference.cross)
    reference.solve()
    assert torch.allclose(student.head.weight, reference.head.weight, atol=1e-4)  # doubling both sums: same head
