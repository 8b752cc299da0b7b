"""ProDA's training loss (Lu et al., CVPR 2022): an upper bound of the expected cross-entropy when the class text
features are Gaussian.

With image feature x and class features t_c, the logits are z_c = x . t_c (the logit scale folded into t). If the
t_c are Gaussian with means m_c, every margin z_j - z_y is Gaussian with mean x . (m_j - m_y) and a variance
v_j, and Jensen's inequality (log is concave) with the Gaussian moment-generating function gives

    E[-log softmax(z)_y] = E[log sum_j exp(z_j - z_y)] <= log sum_j exp(mu_j - mu_y + v_j / 2)
                         = cross_entropy(mu + v / 2, y)         (v_y = 0),

where mu are the logits of the mean features. ProDA estimates a covariance that is diagonal over feature
dimensions but couples the classes, from K prompts' features; it arrives here as a spread (C, K, D) whose outer
products over K sum to that covariance, so v_j = sum_d x_d^2 sum_k (spread[j, k, d] - spread[y, k, d])^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_variance(image_features: torch.Tensor, spread: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, C) variances of the logit margins z_j - z_y, for image features (B, D) and a spread (C, K, D) in logit
    units (see the module docstring); computed in float32 (float64 kept) without forming any (B, C, C) or
    (B, C, K, D) tensor."""
    dtype = torch.promote_types(torch.promote_types(image_features.dtype, spread.dtype), torch.float32)
    x2 = image_features.to(dtype).pow(2)  # (B, D)
    spread = spread.to(dtype)
    own = x2 @ spread.pow(2).sum(dim=1).t()  # (B, C): sum_d x_d^2 sum_k spread[j, k, d]^2
    weighted_true = x2[:, None, :] * spread[labels]  # (B, K, D)
    cross = weighted_true.flatten(1) @ spread.flatten(1).t()  # (B, C)
    variance = own + own.gather(1, labels[:, None]) - 2 * cross
    return variance.clamp(min=0)  # rounding can leave -1e-7 where the margin is deterministic (j = y)


def expected_cross_entropy_bound(
    logits: torch.Tensor, labels: torch.Tensor, variance: torch.Tensor
) -> torch.Tensor:
    """ProDA's loss: the batch mean of the upper bound of E[cross-entropy] above, for the logits of the mean class
    features and the margin variances of :func:`margin_variance`."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits + 0.5 * variance.to(logits.dtype), labels)
