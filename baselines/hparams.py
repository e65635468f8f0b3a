"""Each method's hyper-parameters: the official ones for Llama-3-8B, Qwen2.5-7B and Mistral-7B,
and one stated rule for every other model.

The rule: a model is given the set of its family's reference model (Llama -> Llama-3-8B,
Qwen2/Qwen3/Qwen2-MoE -> Qwen2.5-7B, Mistral -> Mistral-7B). Layer indices are moved by relative
depth: in each run of consecutive layers, the first, layer l of the reference's N_ref, becomes
round((l + 1) / N_ref * N) - 1 of the model's N (the paper's "proportional position", as
edit.py's --layer reads a fraction), and the others keep their distance from it (clipped to the
last layer). MEMIT's and RECT's lambda (mom2_update_weight) follows the MLP width d: it weighs
lambda * C0 against the edits' K^T K, and a key k of ordinary text has E[k^T C0^-1 k] = d, so an
edit's key counts d / lambda against what the layer knows; lambda = lambda_ref * d / d_ref keeps
that ratio the reference's. Every other value (v* settings, thresholds, learning rates) is
unchanged. On the reference models themselves the rule changes nothing.
"""
from __future__ import annotations

import math

FAMILY = {"llama": "Llama-3-8B", "qwen2": "Qwen2.5-7B", "qwen3": "Qwen2.5-7B", "qwen2_moe": "Qwen2.5-7B",
          "mistral": "Mistral-7B"}
REFERENCE_LAYERS = {"Llama-3-8B": 32, "Qwen2.5-7B": 28, "Mistral-7B": 32}
REFERENCE_WIDTH = {"Llama-3-8B": 14336, "Qwen2.5-7B": 18944, "Mistral-7B": 14336}  # intermediate_size

# v* and lambda of the locate-then-edit methods (the same v* settings in MEMIT, AlphaEdit, RECT)
_LLAMA_V = dict(layers=[4, 5, 6, 7, 8], v_num_grad_steps=25, v_lr=0.1, v_weight_decay=0.5, clamp_norm_factor=0.75,
                kl_factor=0.0625, mom2_update_weight=15000)
_QWEN_MISTRAL_V = dict(layers=[4, 5, 6, 7, 8], v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3,
                       clamp_norm_factor=4.0, kl_factor=0.0625, mom2_update_weight=15000)

OFFICIAL = {
    "memit": {
        "Llama-3-8B": (_LLAMA_V, "jianghoucheng/AlphaEdit hparams/MEMIT/Llama3-8B.json"),
        "Qwen2.5-7B": (_QWEN_MISTRAL_V, "zjunlp/EasyEdit hparams/MEMIT/qwen2.5-7b.yaml"),
        "Mistral-7B": (_QWEN_MISTRAL_V, "zjunlp/EasyEdit hparams/MEMIT/mistral-7b.yaml (Mistral-7B-v0.1)"),
    },
    "alphaedit": {
        "Llama-3-8B": ({**_LLAMA_V, "nullspace_threshold": 2e-2, "L2": 10.0},
                       "jianghoucheng/AlphaEdit hparams/AlphaEdit/Llama3-8B.json"),
        "Qwen2.5-7B": ({**_QWEN_MISTRAL_V, "nullspace_threshold": 2e-2, "L2": 1.0},
                       "zjunlp/EasyEdit hparams/AlphaEdit/qwen2.5-7b.yaml"),
        "Mistral-7B": ({**_QWEN_MISTRAL_V, "nullspace_threshold": 2e-2, "L2": 1.0},
                       "no official set: MEMIT's Mistral-7B v* settings with the Qwen2.5-7B null-space settings"),
    },
    "rect": {  # MEMIT's, with the RECT authors' fraction (their code zeroes the 80% smallest relative changes)
        fam: ({**v, "rect_keep": 0.2}, src + " + JasonForJoy/Model-Editing-Hurt rome_main.py (keep 20%)")
        for fam, (v, src) in {"Llama-3-8B": (_LLAMA_V, "jianghoucheng/AlphaEdit hparams/MEMIT/Llama3-8B.json"),
                              "Qwen2.5-7B": (_QWEN_MISTRAL_V, "zjunlp/EasyEdit hparams/MEMIT/qwen2.5-7b.yaml"),
                              "Mistral-7B": (_QWEN_MISTRAL_V, "zjunlp/EasyEdit hparams/MEMIT/mistral-7b.yaml")}.items()
    },
    "ultraedit": {
        "Llama-3-8B": (dict(modules={"gate_proj": [11, 12, 13, 14, 15], "up_proj": [18, 19, 20, 21, 22, 23, 24]},
                            lr=1e-6, sub_batch=10, ridge=1.0),
                       "XiaojieGu/UltraEdit config/model/llama-3-instruct.yaml, config/editor/ultraedit.yaml"),
        "Qwen2.5-7B": (dict(modules={"gate_proj": list(range(18, 27)), "up_proj": list(range(18, 27))},
                            lr=1e-6, sub_batch=10, ridge=1.0),
                       "XiaojieGu/UltraEdit config/model/qwen2.5-7b.yaml, config/editor/ultraedit.yaml"),
        "Mistral-7B": (dict(modules={"down_proj": [29, 30]}, lr=1e-6, sub_batch=10, ridge=1.0),
                       "XiaojieGu/UltraEdit config/model/mistral-7b.yaml (Mistral-7B-v0.3), config/editor/ultraedit.yaml"),
    },
    "ft_l": {
        "Llama-3-8B": (dict(layer=21, lr=5e-4, num_steps=25, batch_size=1, norm_constraint=None),
                       "zjunlp/EasyEdit hparams/FT/llama3-8b.yaml (objective prompt_last)"),
        "Qwen2.5-7B": (dict(layer=27, lr=5e-4, num_steps=25, batch_size=1, norm_constraint=None),
                       "zjunlp/EasyEdit hparams/FT/qwen2.5-7b.yaml (objective prompt_last)"),
        "Mistral-7B": (dict(layer=21, lr=5e-4, num_steps=25, batch_size=1, norm_constraint=5e-5),
                       "zjunlp/EasyEdit hparams/FT/mistral-7b.yaml (objective prompt_last)"),
    },
}
METHODS = list(OFFICIAL)


def proportional(layer: int, n_ref: int, n: int) -> int:
    """Layer `layer` of an n_ref-layer model at the same relative depth of an n-layer one."""
    return min(n - 1, max(0, math.floor((layer + 1) / n_ref * n + 0.5) - 1))


def scale_layers(layers: list[int], n_ref: int, n: int) -> list[int]:
    """Each run of consecutive layers: its first by relative depth, the rest at the same offsets."""
    out = []
    for i, l in enumerate(layers):
        if i == 0 or l != layers[i - 1] + 1:
            start, first = proportional(l, n_ref, n), l
        new = min(n - 1, start + l - first)
        if new not in out:
            out.append(new)
    return out


def resolve(method: str, model_type: str, n_layers: int, width: int) -> tuple[dict, dict]:
    """The hyper-parameters for a model of `n_layers` layers and MLP width `width`, and where
    they come from: (hp, provenance)."""
    family = FAMILY[model_type]
    ref, source = OFFICIAL[method][family]
    n_ref, w_ref = REFERENCE_LAYERS[family], REFERENCE_WIDTH[family]
    hp = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in ref.items()}
    if "layers" in hp:
        hp["layers"] = scale_layers(hp["layers"], n_ref, n_layers)
    if "layer" in hp:
        hp["layer"] = proportional(hp["layer"], n_ref, n_layers)
    if "modules" in hp:
        hp["modules"] = {m: scale_layers(ls, n_ref, n_layers) for m, ls in hp["modules"].items()}
    if "mom2_update_weight" in hp and method != "alphaedit":  # AlphaEdit's solve has no lambda * C0 term
        hp["mom2_update_weight"] = hp["mom2_update_weight"] * width / w_ref
    same = n_layers == n_ref and width == w_ref
    rule = (f"official {family} set" if same else
            f"{family} set ({n_ref} layers, MLP width {w_ref}) moved to {n_layers} layers by relative depth "
            f"(first layer of each run l -> round((l+1)/{n_ref}*{n_layers})-1, the rest at the same offsets)"
            + (f", lambda x {width}/{w_ref}" if "mom2_update_weight" in hp and method != "alphaedit" else "")
            + "; other values unchanged")
    return hp, {"family": family, "source": source, "rule": rule}
