"""Export-friendly Qwen2 for the VACC flow (loaded with trust_remote_code).

A compact Qwen2 that loads a stock Hugging Face Qwen2 checkpoint unchanged (same parameter names) and
computes what transformers' eager Qwen2 computes, written so that tracing it gives a clean graph:

- eager attention with an explicit attention mask (left padding) and `torch.where` masking with the
  dtype's own finite minimum, so fp16 never sees -inf;
- the KV cache is explicit: `past_key_values` is a tuple of (key, value) tensors per layer, shaped
  (B, KVH, P, D), and the same structure comes back as `present`; no cache objects in the graph;
- RMSNorm variance in fp32;
- `iter_num` selects the graph: 0 is prefill ("iter0"), 1 is decode ("iter1"); with
  `config.insert_slice` the prefill keeps only the last position before lm_head ("strided_slice");
- `quantize(8)` swaps q/k/v/o/gate/up/down of every layer for per-channel int8 W8A16 linears.

Works under transformers 4.45.2 (the vendor compiler's pin) and 5.x.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, __version__ as _TRANSFORMERS_VERSION
from transformers.modeling_outputs import CausalLMOutputWithPast

# Relative imports only: trust_remote_code copies these three files as one package.
from .configuration_qwen2_vacc import Qwen2Config, rope_theta, unsupported_reason
from .quantization_vacc import QUANT_METHOD, QuantizedLinearPerChannel, quantize_linear_modules

_TRANSFORMERS_MAJOR = int(_TRANSFORMERS_VERSION.split(".")[0])
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
PROJECTIONS = ATTN_PROJECTIONS + ("gate_proj", "up_proj", "down_proj")


class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)  # fp16 x.pow(2) overflows for |x| > 256
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin tables for explicit position ids: (B, S) -> two (B, S, D) tensors."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv_freq = inv_freq.to(position_ids.device)
    inv = inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)  # (B, D/2, 1)
    pos = position_ids[:, None, :].float()  # (B, 1, S)
    freqs = (inv @ pos).transpose(1, 2)  # (B, S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, D) broadcast over heads
    return (x * cos) + (rotate_half(x) * sin)


def attention_mask_4d(attention_mask, query_len):
    """Boolean (B, 1, S, P+S) mask: key j visible to query i when j is not padding and j <= P + i."""
    total = attention_mask.shape[1]
    past = total - query_len
    q_pos = torch.arange(query_len, device=attention_mask.device)[:, None] + past  # (S, 1)
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]  # (1, P+S)
    causal = k_pos <= q_pos  # (S, P+S)
    keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, P+S)
    return causal[None, None, :, :] & keep


class Qwen2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = self.head_dim ** -0.5
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x, cos, sin, mask, past=None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, KVH, S, D)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, KVH, S, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, KVH, P+S, D)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        n_rep = self.num_heads // self.num_kv_heads
        if n_rep > 1:  # GQA: (B, KVH, T, D) -> (B, KVH, n_rep, T, D) -> (B, H, T, D)
            t = k.shape[2]
            k = k[:, :, None].expand(b, self.num_kv_heads, n_rep, t, self.head_dim).reshape(b, -1, t, self.head_dim)
            v = v[:, :, None].expand(b, self.num_kv_heads, n_rep, t, self.head_dim).reshape(b, -1, t, self.head_dim)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # (B, H, S, T)
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)  # finite in fp16 too
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)  # (B, H, S, D)
        out = out.transpose(1, 2).reshape(b, s, -1)  # (B, S, H*D)
        return self.o_proj(out), present


class Qwen2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Qwen2Attention(config)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past=None):
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class Qwen2PreTrainedModel(PreTrainedModel):
    config_class = Qwen2Config
    base_model_prefix = "model"
    _no_split_modules = ["Qwen2DecoderLayer"]
    _supports_sdpa = False

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, Qwen2RMSNorm):
            module.weight.data.fill_(1.0)


class Qwen2Model(Qwen2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        reason = unsupported_reason(config)
        if reason:
            raise ValueError(reason)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None):
        x = self.embed_tokens(input_ids)  # (B, S, hidden)
        head_dim = self.layers[0].self_attn.head_dim
        cos, sin = rotary_cos_sin(position_ids, head_dim, rope_theta(self.config), x.dtype)
        mask = attention_mask_4d(attention_mask, input_ids.shape[1])
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, cos, sin, mask, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.norm(x), tuple(presents)


class Qwen2ForCausalLM(Qwen2PreTrainedModel):
    # transformers 5.x declares ties as {target: source}; 4.x as a list of tied names.
    _tied_weights_keys = (
        {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]
    )

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        quant = getattr(config, "vacc_quantization", None)
        if quant:  # a folder written by `skywork-deploy quantize`: int8 weights load straight in
            self.quantize(quant.get("bits", 8), include_lm_head=quant.get("include_lm_head", False), empty=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def quantize(self, weight_bit_width=8, include_lm_head=False, empty=False):
        """Swap q/k/v/o/gate/up/down of every layer (and lm_head when asked) for per-channel W8A16 linears.

        `empty=True` builds the int8 modules without computing anything (used when loading a quantized folder).
        """
        targets = [(layer.self_attn if name in ATTN_PROJECTIONS else layer.mlp, name)
                   for layer in self.model.layers for name in PROJECTIONS]
        if include_lm_head:
            targets.append((self, "lm_head"))
        quantize_linear_modules(targets, weight_bit_width, empty=empty)
        self.config.vacc_quantization = {
            "quant_method": QUANT_METHOD, "bits": weight_bit_width, "include_lm_head": include_lm_head,
        }
        return self

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, iter_num=None,
                use_cache=True, return_dict=True, **kwargs):
        """Prefill (iter_num 0) or decode (iter_num 1) step.

        input_ids (B, S); attention_mask (B, P+S) with 0 for padding; position_ids (B, S);
        past_key_values: None or a tuple per layer of (key, value), each (B, KVH, P, D).
        Returns logits (B, S, V), or (B, 1, V) in prefill with `config.insert_slice`, and the presents.
        """
        past_key_values = kwargs.pop("past", past_key_values)
        if past_key_values is not None and not isinstance(past_key_values, (tuple, list)):
            raise TypeError("past_key_values must be a tuple of (key, value) tensors per layer")
        if past_key_values is not None and len(past_key_values) == 0:
            past_key_values = None
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + s, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # count real tokens only, as generate() does for left padding
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
        if iter_num is None:
            iter_num = 0 if past_key_values is None else 1
        hidden, presents = self.model(input_ids, attention_mask, position_ids, past_key_values)
        if iter_num == 0 and getattr(self.config, "insert_slice", False):
            hidden = hidden[:, -1:, :]  # (B, 1, hidden): the prefill "strided_slice"
        logits = self.lm_head(hidden)
        if not return_dict:
            return logits, presents
        return CausalLMOutputWithPast(logits=logits, past_key_values=presents if use_cache else None)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False, temperature=1.0,
                 top_p=1.0, eos_token_id=None, pad_token_id=None, generator=None, streamer=None, **kwargs):
        """Greedy (default) or sampled decoding with the explicit KV cache; returns prompt + new tokens.

        Rows that reach `eos_token_id` are padded with `pad_token_id` (default: the EOS) afterwards.
        """
        gen_cfg = kwargs.pop("generation_config", None)
        if gen_cfg is not None:
            max_new_tokens = getattr(gen_cfg, "max_new_tokens", None) or max_new_tokens
            do_sample = getattr(gen_cfg, "do_sample", do_sample)
            eos_token_id = eos_token_id if eos_token_id is not None else gen_cfg.eos_token_id
        if eos_token_id is None and getattr(self, "generation_config", None) is not None:
            eos_token_id = self.generation_config.eos_token_id
        eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else
                  ([] if eos_token_id is None else [eos_token_id]))
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self(input_ids, attention_mask=attention_mask, iter_num=0)
        past, tokens = out.past_key_values, input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1, :].float()
            if do_sample and temperature > 0:
                nxt = _sample(logits / temperature, top_p, generator)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if streamer is not None:
                streamer.put(nxt.cpu())
            done = done | torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device, dtype=nxt.dtype))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)[:, None]], dim=1)
            out = self(nxt[:, None], attention_mask=attention_mask, past_key_values=past, iter_num=1)
            past = out.past_key_values
        if streamer is not None:
            streamer.end()
        return tokens


def _sample(logits, top_p, generator):
    """Nucleus sampling on (B, V) logits."""
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


__all__ = ["Qwen2Config", "Qwen2Model", "Qwen2ForCausalLM", "QuantizedLinearPerChannel"]
