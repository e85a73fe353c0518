"""ONNX Runtime contrib operators in the ONNX Runtime graphs (`--ort-ops contrib`, the default).

ONNX Runtime's CPU executor pays a few microseconds per node and decode step whatever the node computes; the
portable graph spends ~40 nodes a layer on what three ORT kernels do in one call each:

    per layer, portable (attention.py)                    per layer, contrib
    Pow ReduceMean Add Sqrt Reciprocal Mul Mul + Add  ─►  SkipSimplifiedLayerNormalization (residual + RMSNorm)
    Split Concat Mul Mul Add (rotary on q and k)      ─►  prefill: RotaryEmbedding x 2 (cos/sin table built once)
    Concat past, Reshape, MatMul, Mul, Where,         ─►  GroupQueryAttention (K/V heads shared, past + new into
    Softmax, MatMul, Reshape, Transpose ...                present, mask as an additive bias); in decode it takes
                                                           the fused q|k|v MatMul's output whole and rotates itself

Left padding stays as it is: every row's `seqlens_k` is the full length minus one, and padding plus the
causal mask arrive as one additive bias (B, 1, S, T) computed once per step. Each replacement is a
torch.autograd.Function whose forward is the same arithmetic in torch (the trace runs it) and whose symbolic
emits the contrib node; the export validation compares the result with the reference model as for any graph.
fp32, fp16 and int8 (standard) graphs get them; the vacc flavour never does (the vendor compiles its own op
set), and `--ort-ops onnx` keeps the standard-ops graph for runtimes other than ONNX Runtime.
"""
MS = "com.microsoft"


def _functions():
    import torch
    import torch.nn.functional as F
    from torch.onnx._internal.torchscript_exporter.symbolic_helper import _optional_input_placeholder_tensor

    class SkipRMSNorm(torch.autograd.Function):
        """(normed, sum) = RMSNorm(delta + residual), sum: the residual add fused into the norm."""

        @staticmethod
        def forward(ctx, delta, residual, weight, eps):
            total = delta + residual
            x = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)
            return weight * x, total

        @staticmethod
        def symbolic(g, delta, residual, weight, eps):
            out = g.op(f"{MS}::SkipSimplifiedLayerNormalization", delta, residual, weight, epsilon_f=eps, outputs=4)
            for value in (out[0], out[3]):
                value.setType(delta.type())
            return out[0], out[3]

    def rotate(x, position_ids, cos, sin):
        """x (B, S, N*D) rotated at position_ids (B, S) with tables cos/sin (T, D/2): rotate_half convention."""
        b, s, hidden = x.shape
        d = cos.shape[-1] * 2
        c = torch.cat([cos[position_ids]] * 2, dim=-1)[:, :, None, :]  # (B, S, 1, D)
        sn = torch.cat([sin[position_ids]] * 2, dim=-1)[:, :, None, :]
        heads = x.reshape(b, s, hidden // d, d)  # (B, S, N, D)
        first, second = heads[..., : d // 2], heads[..., d // 2:]
        return (heads * c + torch.cat([-second, first], dim=-1) * sn).reshape(b, s, hidden)

    class Rotary(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, position_ids, cos, sin):
            return rotate(x, position_ids, cos, sin)

        @staticmethod
        def symbolic(g, x, position_ids, cos, sin):
            out = g.op(f"{MS}::RotaryEmbedding", x, position_ids, cos, sin, interleaved_i=0)
            out.setType(x.type())
            return out

    class GroupQueryAttention(torch.autograd.Function):
        """q (B, S, H*D), k/v (B, S, KVH*D), past (B, KVH, P, D) or None, bias (B, 1, S, T) -> out, present k, v.

        Packed: k and v None and q is q|k|v (B, S, (H+2*KVH)*D). Rotary inside: cos/sin (T, D/2) tables and
        position_ids (B, S) given (the kernel reads every row's position only in decode, so prefill rotates
        outside)."""

        @staticmethod
        def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, position_ids, bias, num_heads,
                    kv_heads, scale):
            b, s, _ = q.shape
            if k is None:  # packed (B, S, (H+2*KVH)*D) -> q (B, S, H*D), k and v (B, S, KVH*D)
                d = q.shape[-1] // (num_heads + 2 * kv_heads)
                q, k, v = q.split([num_heads * d, kv_heads * d, kv_heads * d], dim=-1)
            if cos is not None:
                q, k = rotate(q, position_ids, cos, sin), rotate(k, position_ids, cos, sin)
            d = k.shape[-1] // kv_heads
            q = q.reshape(b, s, num_heads, d).transpose(1, 2)  # (B, H, S, D)
            k = k.reshape(b, s, kv_heads, d).transpose(1, 2)  # (B, KVH, S, D)
            v = v.reshape(b, s, kv_heads, d).transpose(1, 2)
            if past_k is not None:
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, KVH, P+S, D)
            grouped = q.reshape(b, kv_heads, -1, d)  # (B, KVH, n_rep*S, D): heads of a group are adjacent
            scores = (grouped @ k.transpose(2, 3) * scale).reshape(b, num_heads, s, -1) + bias  # (B, H, S, T)
            probs = F.softmax(scores, dim=-1).reshape(b, kv_heads, -1, k.shape[2])
            out = (probs @ v).reshape(b, num_heads, s, d).transpose(1, 2).reshape(b, s, num_heads * d)
            return out, k, v

        @staticmethod
        def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, position_ids, bias, num_heads,
                     kv_heads, scale):
            def given(x):
                return x if x is not None and not x.node().mustBeNone() else _optional_input_placeholder_tensor(g)

            rotary = cos is not None and not cos.node().mustBeNone()
            out = g.op(f"{MS}::GroupQueryAttention", q, given(k), given(v), given(past_k), given(past_v), seqlens_k,
                       total, given(cos), given(sin), given(position_ids), bias, num_heads_i=num_heads,
                       kv_num_heads_i=kv_heads, scale_f=scale, do_rotary_i=int(rotary), outputs=3)
            out[0].setType(q.type().with_sizes([None] * 3))
            for present in out[1:]:  # (B, KVH, T, D): typed so the exporter does not warn about a missing shape
                present.setType(q.type().with_sizes([None] * 4))
            return tuple(out)

    return SkipRMSNorm.apply, Rotary.apply, GroupQueryAttention.apply


def ort_patches():
    """Export patches [(owner, attribute, replacement, reason)] for graphs.export_patches."""
    import torch

    from ..source_code import modeling_qwen2_vacc as modeling

    skip_norm, rotary, gqa = _functions()

    def rotary_tables(attention_mask, head_dim, theta, dtype):
        """cos/sin (T, D/2) for positions 0..T-1: the values rotary_cos_sin computes, as a lookup table."""
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        positions = torch.ones_like(attention_mask[0]).cumsum(0).sub(1).float()  # (T,): 0..T-1
        freqs = positions[:, None] * inv_freq[None, :]  # (T, D/2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def model_forward(self, input_ids, attention_mask, position_ids, past_key_values=None):
        x = self.embed_tokens(input_ids)  # (B, S, hidden)
        first = self.layers[0].self_attn
        cos, sin = rotary_tables(attention_mask, first.head_dim, modeling.rope_theta(self.config), x.dtype)
        keep = modeling.attention_mask_4d(attention_mask, input_ids.shape[1])  # (B, 1, S, T)
        bias = torch.zeros_like(keep, dtype=x.dtype).masked_fill(~keep, torch.finfo(x.dtype).min)
        ones = torch.ones_like(attention_mask)
        seqlens_k = (ones.sum(-1) - 1).to(torch.int32)  # (B,): every row is full length (left padding)
        total = ones[0].sum().to(torch.int32)  # scalar T
        h = self.layers[0].input_layernorm(x)
        presents = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            heads = (attn.num_heads, attn.num_kv_heads, attn.scaling)
            if past_key_values is not None and attn.head_dim % 16 == 0:  # decode: packed, rotary in the kernel
                qkv = torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], dim=-1)  # fuse.py: one MatMul
                out, pk, pv = gqa(qkv, None, None, *past_key_values[i], seqlens_k, total, cos, sin, position_ids,
                                  bias, *heads)
            else:  # prefill (left-padded rows need every position) or a head size the kernel's rotary refuses
                past = past_key_values[i] if past_key_values is not None else (None, None)
                q = rotary(attn.q_proj(h), position_ids, cos, sin)
                k = rotary(attn.k_proj(h), position_ids, cos, sin)
                out, pk, pv = gqa(q, k, attn.v_proj(h), *past, seqlens_k, total, None, None, None, bias, *heads)
            presents.append((pk, pv))
            norm = layer.post_attention_layernorm
            h, x = skip_norm(attn.o_proj(out), x, norm.weight, norm.variance_epsilon)
            norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, x = skip_norm(layer.mlp(h), x, norm.weight, norm.variance_epsilon)
        return h, tuple(presents)

    return [(modeling.Qwen2Model, "core", model_forward,
             "ONNX Runtime contrib ops: SkipSimplifiedLayerNormalization, RotaryEmbedding, GroupQueryAttention")]
