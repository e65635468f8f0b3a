"""UltraEdit (Gu et al., 2025): a closed-form update from one forward and backward pass.

For a batch of edits, in sub-batches of `sub_batch` edits (longest first, as the official loader
sorts them): prompt + answer goes through the model, the loss is the mean cross-entropy of the
answer tokens, and at every edited linear module two things are read at the positions that
predict an answer token: its input k and the loss's gradient g at its output. Then per module:

    [k_hat, g_hat] = lifelong normalisation of [k, g]   (running mean and std over every batch so
                                                          far, one per module shape, this batch included)
    v = -lr * |k_hat|^2 * g_hat                          (a scaled, normalised gradient step per token)
    dW^T = (K^T K + ridge I)^-1 K^T V                    (ridge regression from raw keys to v)

and dW is added to every module at once. No subject, no covariance, no training: the running
normalisation is the only state, carried from batch to batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data import collate

EPS = torch.finfo(torch.float32).eps  # the official normaliser's epsilon (float32 features)


class RunningNorm:
    """The official lifelong normaliser: a running mean, a running sum of squared deviations
    and std = sqrt(that / (count - 1)), updated batch by batch with the official formula, in float64."""

    def __init__(self, size: int):
        self.n = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.var = torch.zeros(size, dtype=torch.float64)  # the accumulated sum, as the official `var` buffer
        self.std = torch.zeros(size, dtype=torch.float64)

    def update(self, x: torch.Tensor):
        x = x.double()
        b = x.shape[0]
        n = self.n + b
        delta = x.mean(0) - self.mean
        self.mean += b * delta / n
        batch_var = x.var(0) if b > 1 else torch.zeros_like(self.mean)  # one row: no spread (officially NaN)
        self.var += b * batch_var + self.n * b * delta ** 2 / n
        self.std = (self.var / (n - 1 + EPS)).sqrt()
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / (self.std + EPS)

    def state(self) -> dict[str, torch.Tensor]:
        return {"n": torch.tensor([self.n], dtype=torch.float64), "mean": self.mean, "var": self.var, "std": self.std}

    def load(self, s: dict[str, torch.Tensor]):
        self.n, self.mean, self.var, self.std = int(s["n"][0]), s["mean"].clone(), s["var"].clone(), s["std"].clone()


def module_key(model, name: str) -> str:
    """Modules of one shape share a normaliser (the official code keys it by (in, out))."""
    w = model.get_submodule(name).weight
    return f"{w.shape[1]}x{w.shape[0]}"


def ridge_solve(K: torch.Tensor, V: torch.Tensor, ridge: float) -> torch.Tensor:
    """X = (K^T K + ridge I)^-1 K^T V in float64: the weight change (in, out) taking keys to values."""
    K, V = K.double(), V.double()
    return torch.linalg.solve(K.T @ K + ridge * torch.eye(K.shape[1], dtype=torch.float64), K.T @ V)


def keys_and_grads(model, encoded, modules: list[str], sub_batch: int) -> dict[str, tuple[list, list]]:
    """Per module, the inputs and output gradients at answer-predicting positions, sub-batch by
    sub-batch: {name: ([k (N_b, in)], [g (N_b, out)])}."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # longest first, as the official loader
    low = min(int(m.split(".")[2]) for m in modules)
    found = {m: ([], []) for m in modules}
    for s in range(0, len(order), sub_batch):
        b = collate([encoded[i] for i in order[s:s + sub_batch]], pad_id=0)  # right padding: no mask needed
        at = b.predict_mask
        handles = []
        for m in modules:
            def hook(mod, args, output, m=m):
                found[m][0].append(args[0][at].detach().float())
                output.register_hook(lambda g, m=m: found[m][1].append(g[at].float()))
            handles.append(model.get_submodule(m).register_forward_hook(hook))
        try:
            with torch.no_grad():
                h = model.hidden_states(b.ids, layer=low)  # nothing below the lowest module changes
            h.requires_grad_()
            logits = model.forward_from(h, low, logits_at=at)
            F.cross_entropy(logits.float(), b.labels).backward()  # the mean over the sub-batch's answer tokens
        finally:
            for hd in handles:
                hd.remove()
    return found


def edit_batch(model, encoded, hp: dict, norms: dict[str, RunningNorm], say=lambda s: None) -> dict:
    """Apply UltraEdit for the training sequences `encoded` ((ids, n_prompt) pairs) to `model` in
    place, updating the lifelong normalisers. Returns a log."""
    modules = [f"model.layers.{l}.mlp.{m}" for m, layers in hp["modules"].items() for l in layers]
    found = keys_and_grads(model, encoded, modules, hp["sub_batch"])
    for m in modules:  # the whole batch enters the statistics before any update is computed
        key = module_key(model, m)
        for k, g in zip(*found[m]):
            norms.setdefault(key, RunningNorm(k.shape[1] + g.shape[1])).update(torch.cat([k, g], -1))
    log = {"modules": []}
    for m in modules:
        K, G = torch.cat(found[m][0]), torch.cat(found[m][1])
        z = norms[module_key(model, m)](torch.cat([K, G], -1))
        k_hat, g_hat = z[:, :K.shape[1]], z[:, K.shape[1]:]
        V = -hp["lr"] * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat
        dW = ridge_solve(K, V, hp["ridge"]).T  # (out, in), the weight's layout
        W = model.get_submodule(m).weight
        with torch.no_grad():
            W.copy_((W.double() + dW).to(W.dtype))
        log["modules"].append({"module": m, "tokens": K.shape[0], "update_norm": dW.norm().item()})
    say(f"{len(modules)} modules, {K.shape[0]} answer tokens, mean |dW| "
        f"{sum(x['update_norm'] for x in log['modules']) / len(modules):.4g}")
    return log
