import math

import pytest
import torch

from smi_plugin.optim import BasisAdam, cosine_lr, lr_at, set_lr, shrink_rows


def test_cosine_lr_warms_up_linearly_then_decays_to_zero():
    assert [cosine_lr(1.0, s, 10, warmup=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_lr(1.0, 4, 10, warmup=4) == 1.0
    assert cosine_lr(2.0, 7, 10, warmup=4) == pytest.approx(1.0)  # halfway through the decay
    assert cosine_lr(1.0, 10, 10, warmup=4) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.3, 0, 100) == 0.3 and cosine_lr(0.3, 50, 100) == pytest.approx(0.15)


def test_lr_at_matches_the_schedules_and_rejects_unknown_ones():
    assert lr_at("constant", 0.25, 99, 100) == 0.25
    assert lr_at("cosine", 0.25, 30, 100, 10) == 0.25 * 0.5 * (1 + math.cos(math.pi * 20 / 90))
    with pytest.raises(ValueError, match="constant"):
        lr_at("step", 0.1, 0, 10)


def test_shrunk_rows_continue_exactly_like_the_full_optimizer():
    """Adam is elementwise: after shrinking, the survivors' next steps equal the full run's rows."""
    torch.manual_seed(0)
    make = lambda p: torch.optim.Adam([p], lr=0.1, betas=(0.5, 0.99))
    full = torch.randn(2, 5, 3, requires_grad=True)
    optimizer = make(full)
    target = torch.randn(2, 5, 3)

    def run(param, opt, rows):
        opt.zero_grad()
        ((param - target.gather(1, rows.unsqueeze(-1).expand(-1, -1, 3))) ** 2).sum().backward()
        opt.step()

    everything = torch.arange(5).expand(2, -1)
    for _ in range(3):
        run(full, optimizer, everything)
    rows = torch.tensor([[0, 3], [1, 4]])
    small, small_opt = shrink_rows(full, optimizer, rows, make)
    assert small.is_leaf and small.requires_grad
    assert small_opt.state[small]["step"] == optimizer.state[full]["step"]
    for _ in range(2):
        run(full, optimizer, everything)
        run(small, small_opt, rows)
    assert torch.equal(small, full.gather(1, rows.unsqueeze(-1).expand(-1, -1, 3)))


def test_set_lr_sets_every_group():
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                                 {"params": [torch.zeros(1, requires_grad=True)], "lr": 3.0}], lr=1.0)
    set_lr(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]


def _quadratic_steps(make, steps=4):
    """Parameters after ``steps`` of ``make``'s optimizer on a fixed quadratic (seeded)."""
    torch.manual_seed(1)
    param = torch.randn(3, 4, 8, requires_grad=True)
    target, weight = torch.randn(3, 4, 8), torch.rand(3, 4, 8) + 0.5
    optimizer = make(param)
    for _ in range(steps):
        optimizer.zero_grad()
        (weight * (param - target) ** 2).sum().backward()
        optimizer.step()
    return param, optimizer


def test_basis_adam_with_the_identity_basis_is_torch_adam():
    ours, _ = _quadratic_steps(lambda p: BasisAdam([p], torch.eye(4), lr=0.1, betas=(0.5, 0.99)))
    reference, _ = _quadratic_steps(lambda p: torch.optim.Adam([p], lr=0.1, betas=(0.5, 0.99)))
    assert torch.allclose(ours.detach(), reference.detach(), atol=1e-6)


def test_basis_adam_normalizes_each_coefficient_in_the_basis():
    """One step from zero moments is -lr * M @ sign(M^T g) per block (Adam's first step is lr * sign),
    computed by hand; with a scaled basis, the scaled-down coefficients move less."""
    basis = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))[0] * torch.tensor(
        [2.0, 1.0, 0.5, 0.25])
    param = torch.zeros(2, 8, requires_grad=True)
    grad = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    optimizer = BasisAdam([param], basis, lr=0.1, eps=0.0)
    param.grad = grad.clone()
    optimizer.step()
    expected = -0.1 * (torch.sign(grad.reshape(-1, 4) @ basis) @ basis.T).view(2, 8)
    assert torch.allclose(param.detach(), expected, atol=1e-6)
    coefficients = torch.linalg.solve(basis, param.detach().reshape(-1, 4).T).T  # back to the basis
    assert torch.allclose(coefficients.abs(), torch.full_like(coefficients, 0.1), atol=1e-5)


def test_basis_adam_state_is_shrunk_like_adams():
    """shrink_rows gathers BasisAdam's moments: the survivors continue exactly (blocks are within rows)."""
    basis = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2)))[0]
    make = lambda p: BasisAdam([p], basis, lr=0.05, betas=(0.5, 0.99))
    full, optimizer = _quadratic_steps(make, steps=2)
    rows = torch.tensor([[0, 2], [1, 3], [3, 0]])
    small, small_optimizer = shrink_rows(full, optimizer, rows, make)
    target = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(4))
    for param, opt, index in ((full, optimizer, torch.arange(4).expand(3, -1)), (small, small_optimizer, rows)):
        opt.zero_grad()
        ((param - target.gather(1, index.unsqueeze(-1).expand(-1, -1, 8))) ** 2).sum().backward()
        opt.step()
    assert torch.allclose(small, full.gather(1, rows.unsqueeze(-1).expand(-1, -1, 8)), atol=1e-6)


def test_basis_adam_pickles_with_its_basis():
    """Checkpoints pickle the optimizer (the online pool's slots): the basis must survive."""
    import pickle

    basis = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(5)))[0]
    make = lambda p: BasisAdam([p], basis, lr=0.05)
    param, optimizer = _quadratic_steps(make, steps=2)
    copy_param, copy_optimizer = pickle.loads(pickle.dumps((param, optimizer)))
    for p, opt in ((param, optimizer), (copy_param, copy_optimizer)):
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(param, copy_param)


def test_basis_adam_rejects_a_basis_that_does_not_tile_the_rows():
    with pytest.raises(ValueError, match="square"):
        BasisAdam([torch.zeros(2, 4, requires_grad=True)], torch.zeros(4, 3))
    param = torch.zeros(2, 6, requires_grad=True)
    param.grad = torch.ones(2, 6)
    with pytest.raises(ValueError, match="blocks of 4"):
        BasisAdam([param], torch.eye(4)).step()
