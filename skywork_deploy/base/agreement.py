"""How closely one set of logits follows another: the one definition every stage and benchmark reports.

Pure NumPy on (positions, vocab) arrays, computed in float64.
"""
import numpy as np


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logit_agreement(ours, ref):
    """max |diff|, cosine (mean and min over positions), top-1 agreement and mean KL(ref || ours)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-300)
    lp_ref, lp_ours = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(lp_ref) * (lp_ref - lp_ours)).sum(-1)  # (positions,)
    return {"max_abs_diff": float(np.abs(ours - ref).max()), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()), "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
            "kl_mean": float(kl.mean()), "positions": int(len(ref))}
