"""Grouped-query attention without repeating K/V, as an export patch for the ONNX Runtime graphs.

The model repeats each K/V head n_rep times (Expand + Reshape: a copy of the whole cache per layer and step,
7x the cache on the 0.5B shape) so that every query head has its own. The patched forward groups the query
heads instead: query head h uses K/V head h // n_rep, and the heads of one group are adjacent, so

    q (B, H, S, D) ─► reshape (B, KVH, n_rep*S, D) ─► @ k^T (B, KVH, D, T) ─► scores (B, KVH, n_rep*S, T)
                   ─► reshape (B, H, S, T) ─► mask, softmax (unchanged) ─► reshape (B, KVH, n_rep*S, T)
                   ─► @ v (B, KVH, T, D) ─► (B, KVH, n_rep*S, D) ─► reshape (B, H, S, D)

Each score and each output is the same dot product as before (same operands, same order), so the logits
match the unpatched graph. Every reshape is emitted with a constant target (0 = keep that axis, -1 = infer),
so the graph computes no shapes at run time (the traced `view(b, s, -1, d)` costs Shape, Gather, Unsqueeze
and Concat nodes per reshape; ONNX Runtime spends a few microseconds on each node of each decode step).
The vacc flavour is traced without this patch (the vendor's graph stays as is).
"""


def _static_reshape():
    """reshape(x, target) with ONNX Reshape semantics (0 keeps that axis of x, -1 is inferred), traced as one
    Reshape node with a constant target."""
    import torch

    class StaticReshape(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, target):
            return x.reshape([x.shape[i] if t == 0 else t for i, t in enumerate(target)])

        @staticmethod
        def symbolic(g, x, target):
            out = g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(target, dtype=torch.int64)))
            if x.type().dim() is not None:  # rank (and fixed sizes) for the exporter's later symbolics
                out.setType(x.type().with_sizes([t if t > 0 else None for t in target]))
            return out

    return StaticReshape.apply


def ort_patches():
    """Export patches [(owner, attribute, replacement, reason)] for graphs.export_patches."""
    import torch
    import torch.nn.functional as F

    from ..source_code import modeling_qwen2_vacc as modeling

    reshape = _static_reshape()
    original_cos_sin = modeling.rotary_cos_sin

    def rotary_cos_sin(position_ids, head_dim, theta, dtype):
        cos, sin = original_cos_sin(position_ids, head_dim, theta, dtype)  # (B, S, D)
        half = head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # rotate_half's sign, folded in once
        return cos.unsqueeze(2), sin.unsqueeze(2)  # (B, S, 1, D): broadcast over the heads of (B, S, N, D)

    def forward(self, x, cos, sin, mask, past=None):
        d, kvh, h = self.head_dim, self.num_kv_heads, self.num_heads
        qk = torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1)  # (B, S, (H+KVH)*D)
        qk = reshape(qk, [0, 0, h + kvh, d])  # (B, S, H+KVH, D)
        first, second = qk.split(d // 2, dim=-1)
        qk = qk * cos + torch.cat([second, first], dim=-1) * sin  # rotary: x*cos + rotate_half(x)*sin
        q, k = qk.split([h, kvh], dim=2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, S, D), (B, KVH, S, D)
        v = reshape(self.v_proj(x), [0, 0, kvh, d]).transpose(1, 2)  # (B, KVH, S, D)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, KVH, P+S, D)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        grouped = reshape(q, [0, kvh, -1, d])  # (B, KVH, n_rep*S, D)
        scores = torch.matmul(grouped, k.transpose(2, 3)) * self.scaling  # (B, KVH, n_rep*S, T)
        scores = reshape(scores, [0, h, -1, 0])  # (B, H, S, T)
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)  # finite in fp16 too
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(reshape(probs, [0, kvh, -1, 0]), v)  # (B, KVH, n_rep*S, D)
        out = reshape(out, [0, h, -1, d]).transpose(1, 2)  # (B, S, H, D)
        out = reshape(out, [0, 0, h * d])  # (B, S, H*D)
        return self.o_proj(out), present

    return [(modeling.Qwen2Attention, "attend", forward,
             "group query heads per K/V head instead of repeating K/V (no per-step copy of the cache); rotary "
             "on q and k together; constant reshape targets"),
            (modeling, "rotary_cos_sin", rotary_cos_sin,
             "cos/sin shaped (B, S, 1, D) for the patched attention, rotate_half's sign folded into sin")]
