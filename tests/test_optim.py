import math

import pytest
import torch

from smi_plugin.optim import cosine_lr, lr_at, set_lr, shrink_rows


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
