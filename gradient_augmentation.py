"""Gradient Augmentation (Huang et al., IEEE TMM 2022) and the baselines of the paper's tables.

L_all = L_CE + eta * L_S + L_GA^A + L_GA^I
"""

from __future__ import annotations

import torch


def similarity_matching_loss(
    query_features: torch.Tensor, target_features: torch.Tensor
) -> torch.Tensor:
    """L_S = mean_i ||f_comp_i - f_target_i||^2. (B, D), (B, D) -> scalar."""
    return (query_features - target_features).pow(2).sum(dim=1).mean()
