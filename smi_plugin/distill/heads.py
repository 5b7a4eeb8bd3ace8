"""Linear-probe heads: ``LeastSquaresHead`` solves a student's head exactly for the teacher's logits over
every finished sample; ``linear_probe_student`` is the paper's student (a backbone with a new head)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..batch import InvertedBatch
from .kd import forward_sparse

Reduce = Callable[[torch.Tensor], torch.Tensor]


class LeastSquaresHead:
    """A linear head on frozen features, solved exactly: the ridge least-squares map from the features to the
    teacher's logits over every sample accumulated so far.

    Matching logits in the mean-square sense is KD's high-temperature limit (Hinton et al., 2015; the paper's
    T = 20 is near it), and for a linear head on a frozen backbone it is a convex quadratic whose optimum two
    running sums determine (``gram`` of the features with a constant column, ``cross`` with the logits). Gradient
    descent stalls on it: a ViT's pooled features are LayerNorm outputs whose covariance spans many decades of
    eigenvalues, so SGD fits the leading directions only (on the same 1024 Fashion-MNIST inversions, a head from
    2000 SGD steps reached 61.5% on real images, the solved one 67.0%).

    Args:
        head: the ``nn.Linear`` to solve; ``solve()`` overwrites its weight (and bias).
        ridge: added to the features' diagonal, relative to its mean (the bias is not shrunk).
    """

    def __init__(self, head: nn.Module, ridge: float = 1e-5) -> None:
        if not isinstance(head, nn.Linear):
            raise ValueError(f"probe_head='least-squares' solves an nn.Linear head, not {type(head).__name__}; "
                             "use probe_head='gradient'")
        self.head, self.ridge = head, ridge
        columns = head.in_features + (head.bias is not None)
        self.gram = torch.zeros(columns, columns, dtype=torch.float64, device=head.weight.device)
        self.cross = torch.zeros(columns, head.out_features, dtype=torch.float64, device=head.weight.device)

    def design(self, features: torch.Tensor) -> torch.Tensor:
        """The least-squares design matrix of ``features``: float64, with a constant column for the bias."""
        features = features.to(torch.float64)
        if self.head.bias is None:
            return features
        return torch.cat([features, features.new_ones(len(features), 1)], dim=1)

    def increments(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a batch adds to ``(gram, cross)``."""
        design = self.design(features)
        return design.T @ design, design.T @ targets.to(torch.float64)

    def accumulate(self, gram: torch.Tensor, cross: torch.Tensor) -> None:
        self.gram += gram
        self.cross += cross

    @torch.no_grad()
    def solve(self) -> None:
        """Write the ridge solution over everything accumulated into the head."""
        features = self.head.in_features
        shrink = torch.zeros(len(self.gram), dtype=torch.float64, device=self.gram.device)
        shrink[:features] = self.ridge * self.gram.diagonal()[:features].mean().clamp_min(1e-12)
        solution = torch.linalg.solve(self.gram + torch.diag(shrink), self.cross)
        self.head.weight.copy_(solution[:features].T)
        if self.head.bias is not None:
            self.head.bias.copy_(solution[features])

    def absorb(self, student: nn.Module, teacher: nn.Module, samples: InvertedBatch, *, flip: bool,
               reduce: Reduce | None = None) -> None:
        """Add each sample's kept view (and its mirror, with ``flip``) to the sums and solve the head again.

        ``student`` holds this head; its features and ``teacher``'s logits are read on ``samples``. ``reduce``
        sums the increments over processes (each process absorbs its own samples; all solve the same head).
        """
        device = self.head.weight.device
        x, m = samples.normalized().to(device), samples.patch_mask.to(device)
        views = [(x, m), (x.flip(-1), m.flip(-1))] if flip else [(x, m)]
        for view, mask in views:
            with torch.no_grad(), headless(student, self.head):  # the features, in input order
                features = forward_sparse(student, view, mask)
            with torch.no_grad():
                teacher_logits = forward_sparse(teacher, view, mask)
            gram, cross = self.increments(features, teacher_logits)
            if reduce is not None:
                gram, cross = reduce(gram), reduce(cross)
            self.accumulate(gram, cross)
        self.solve()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"gram": self.gram, "cross": self.cross}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.gram.copy_(state["gram"])
        self.cross.copy_(state["cross"])


@contextmanager
def headless(model: nn.Module, head: nn.Module) -> Iterator[None]:
    """Within the context, ``model``'s submodule ``head`` is an ``nn.Identity``: the model returns its features."""
    name = next(name for name, module in model.named_modules() if module is head)
    parent, _, attribute = name.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, attribute, nn.Identity())
    try:
        yield
    finally:
        setattr(owner, attribute, head)


def linear_probe_student(backbone: nn.Module, num_classes: int) -> nn.Module:
    """The paper's student: a backbone with a new classifier head; only the head trains."""
    student = copy.deepcopy(backbone)
    student.reset_classifier(num_classes)
    return student
