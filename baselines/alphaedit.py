"""AlphaEdit (Fang et al., 2025): MEMIT's update, projected so that it cannot touch what the
layer already knows.

P projects onto the span of C0's eigenvectors whose eigenvalues are below
`nullspace_threshold` (the near-null space of ordinary text's keys): for a key k of ordinary text
P k ~ 0, and every update has the form dW = dW P, so dW k ~ 0. Per batch and layer, as the
official code solves it (in float64 here):

    dW^T = (P (K^T K + Cp) + L2 I)^-1 P K^T R

with K, R as in MEMIT and Cp the sum of k k^T over the keys of every earlier batch (read after
that batch was written), which keeps later batches off earlier edits. Cp is the method's lifelong
state: carried from batch to batch, and saved beside the delta so a run can continue.
"""
from __future__ import annotations

import torch

from baselines import locate
from baselines.memit import VSTAR_KEYS, down_proj, set_weight


def projection(C0: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P = U U^T over C0's eigenvectors with eigenvalue < threshold, and their number (the rank
    of the null space kept for edits). C0 is symmetric, so this is the official SVD's subspace."""
    evals, U = torch.linalg.eigh(C0.double())
    U = U[:, evals < threshold]
    return U @ U.T, U.shape[1]


def alphaedit_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, Cp: torch.Tensor, l2: float) -> torch.Tensor:
    """dW (D, inter) from keys K (n, inter), residuals R (n, D), projection P and earlier keys' Cp."""
    K, R = K.double(), R.double()
    A = P @ (K.T @ K + Cp) + l2 * torch.eye(P.shape[0], dtype=torch.float64)
    return torch.linalg.solve(A, P @ K.T @ R).T


def edit_batch(model, tok, reqs, templates, hp: dict, P: dict, Cp: dict, say=lambda s: None) -> dict:
    """Apply AlphaEdit for `reqs` to `model` in place and add this batch's keys to Cp. Returns a log."""
    layers, z = hp["layers"], hp["layers"][-1]
    zs, vlog = locate.target_values(model, tok, reqs, templates, z, locate.VStar(**{k: hp[k] for k in VSTAR_KEYS}), say)
    log = {"v_star": vlog, "layers": []}
    for i, l in enumerate(layers):
        K = locate.keys(model, tok, reqs, templates, [l])[l]
        R = (zs - locate.subject_outputs(model, tok, reqs, z)) / (len(layers) - i)
        dW = alphaedit_update(K, R, P[l], Cp[l], hp["L2"])
        W = down_proj(model, l)
        set_weight(W, W.detach().double() + dW)
        log["layers"].append({"layer": l, "residual_norm": R.norm(dim=1).mean().item() * (len(layers) - i),
                              "update_norm": dW.norm().item()})
        say(f"layer {l}: mean |v* - now| {log['layers'][-1]['residual_norm']:.3f}, |dW| {dW.norm().item():.4f}")
    for l, K in locate.keys(model, tok, reqs, templates, layers).items():  # the keys as the edited model reads them
        Cp[l] += K.double().T @ K.double()
    return log
