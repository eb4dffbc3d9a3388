"""Least-squares refits used when a model is cut: new weights that reproduce the old outputs."""

from __future__ import annotations

import torch


def ridge_toward(gram: torch.Tensor, cross: torch.Tensor, initial: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W |Z W - Y|² + s·|W - initial|², s = ridge · mean(diag(ZᵀZ)), from gram = ZᵀZ and cross = ZᵀY.

    (F, F), (F, H), (F, H) -> (F, H). Scaling the penalty by the features'
    mean energy makes `ridge` independent of their scale; pulling towards the
    original weights (rather than zero) keeps them where data is scarce.
    """
    scale = ridge * gram.diagonal().mean()
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + scale * eye, cross + scale * initial)
