"""Post-hoc calibration fitted after training: temperature scaling (Guo et al., ICML 2017).

One scalar T > 0 divides the logits; it is fitted by minimising the NLL of held-out labelled logits (CoOp's
few-shot validation set), so it assumes that set looks like the test data. It cannot change a prediction's argmax,
only its confidence. The fitted T is saved with the prompt (``calibration.json``) and applied when it is loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the mean NLL of ``logits / T`` (L-BFGS on log T, float64)."""
    if len(labels) == 0:
        raise ValueError("Temperature scaling needs at least one labelled example.")
    logits, labels = torch.as_tensor(logits).double(), torch.as_tensor(labels).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp())
