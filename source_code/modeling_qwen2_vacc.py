"""Export-friendly Qwen2 for the VACC flow (loaded with trust_remote_code), a drop-in for transformers' Qwen2.

Same class names, module tree and parameter names as stock Qwen2, and the signatures and return types of
transformers 4.4x at every level (Qwen2ForCausalLM, Qwen2Model, Qwen2DecoderLayer, Qwen2Attention), so
whatever drives a stock Qwen2 (generate, GPTQ layer replay, torch.jit.trace, torch.onnx.export) drives this
one. It computes what transformers' eager Qwen2 computes, written so that every exporter since torch 2.1
writes a valid graph:

- eager attention; masking by `masked_fill` with the dtype's finite minimum (fp16 never sees -inf, and the
  fill constant is typed like the scores); RMSNorm variance in fp32; rotary tables computed from float32
  tensors;
- caches: legacy per-layer `(key, value)` tuples (B, KVH, T, D) in -> tuples out (no cache object in the
  graph), a transformers `Cache` in -> the same cache out;
- the vendor's graph switches are read from the config once, at construction: `iter_num` (0 prefill "iter0",
  1 decode "iter1") and `insert_slice` (the prefill keeps only the last position before lm_head); our own
  exporter may still pass `iter_num=` to forward;
- `quantize(8)` swaps q/k/v/o/gate/up/down of every layer for W8A16 linears that export as
  `Vastai::QuantizedLinearPerChannel`.

Tested under transformers 4.45.2 (the vendor compiler's pin; torch 2.1.0 and 2.13) and 5.x; written for 4.37+.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, __version__ as _TRANSFORMERS_VERSION
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from transformers.cache_utils import Cache
except ImportError:  # older than 4.36: legacy tuples only
    Cache = ()

# Relative imports only: trust_remote_code copies these three files as one package.
from .configuration_qwen2_vacc import Qwen2Config, rope_theta, unsupported_reason
from .quantization_vacc import QUANT_METHOD, QuantizedLinearPerChannel, quantize as _quantize

_TRANSFORMERS_MAJOR = int(_TRANSFORMERS_VERSION.split(".")[0])
# transformers >= 5.2x names the cache `cache` (outputs and keywords); earlier versions `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
PROJECTIONS = ATTN_PROJECTIONS + ("gate_proj", "up_proj", "down_proj")


def _cache_kwarg(past, kwargs):
    """The cache wherever the caller put it: `past_key_value(s)` (4.x), `cache` (5.2x), `past` (older)."""
    for name in ("cache", "past_key_values", "past_key_value", "past"):
        if kwargs.get(name) is not None:
            past = kwargs.pop(name)
    return past


def _return_dict(config, value):
    """`return_dict` as transformers resolves it (tuples when the config says torchscript)."""
    if value is not None:
        return value
    return bool(getattr(config, "return_dict", True)) and not getattr(config, "torchscript", False)


def _past_length(past, layer_idx=0):
    """Cached positions in a Cache, a model's tuple of per-layer (key, value), or one layer's (key, value)."""
    if isinstance(past, Cache):
        return past.get_seq_length(layer_idx)
    if past is None or len(past) == 0:
        return 0
    return past[0].shape[2] if torch.is_tensor(past[0]) else past[layer_idx][0].shape[2]


class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)  # fp16 x.pow(2) overflows for |x| > 256
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin tables for explicit position ids: (B, S) -> two (B, S, D) tensors."""
    base = torch.full((), theta, dtype=torch.float32, device=position_ids.device)  # typed: no double in the graph
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = base.pow(exponent).reciprocal()  # (D/2,)
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
    """Boolean (B, 1, S, P+S) keep-mask from a 2-D (B, P+S) one: key j visible to query i when j is not
    padding and j <= P + i. A 4-D mask (boolean keep-mask or additive float) is returned as it is."""
    if attention_mask.dim() == 4:
        return attention_mask
    total = attention_mask.shape[1]
    past = total - query_len
    q_pos = torch.arange(query_len, device=attention_mask.device)[:, None] + past  # (S, 1)
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]  # (1, P+S)
    causal = k_pos <= q_pos  # (S, P+S)
    keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, P+S)
    return causal[None, None, :, :] & keep


class Qwen2Attention(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = self.head_dim ** -0.5
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None,
                **kwargs):
        """transformers 4.4x: -> (attn_output (B, S, hidden), attn_weights or None, past_key_value)."""
        past = _cache_kwarg(past_key_value, kwargs)
        b, s, _ = hidden_states.shape
        past_len = _past_length(past, self.layer_idx)
        if position_embeddings is None:
            if position_ids is None:
                position_ids = torch.arange(past_len, past_len + s, device=hidden_states.device)[None].expand(b, -1)
            position_embeddings = rotary_cos_sin(position_ids, self.head_dim, rope_theta(self.config),
                                                 hidden_states.dtype)
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + s, dtype=torch.long, device=hidden_states.device)
        mask = attention_mask_4d(attention_mask, s)
        extra = {"return_weights": True} if output_attentions else {}
        out = self.attend(hidden_states, *position_embeddings, mask, past, **extra)
        return out[0], (out[2] if output_attentions else None), out[1]

    def attend(self, x, cos, sin, mask, past=None, return_weights=False):
        """The attention math: x (B, S, hidden), cos/sin (B, S, D), mask (B, 1, S, T) boolean keep-mask or
        additive float, past None, (key, value) or a Cache -> (output (B, S, hidden), present[, weights])."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, KVH, S, D)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, KVH, S, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(past, Cache):
            k, v = past.update(k, v, self.layer_idx)  # (B, KVH, P+S, D)
            present = past
        else:
            if past is not None:
                k = torch.cat([past[0], k], dim=2)  # (B, KVH, P+S, D)
                v = torch.cat([past[1], v], dim=2)
            present = (k, v)
        n_rep = self.num_key_value_groups
        if n_rep > 1:  # GQA: (B, KVH, T, D) -> (B, KVH, n_rep, T, D) -> (B, H, T, D)
            t = k.shape[2]
            k = k[:, :, None].expand(b, self.num_kv_heads, n_rep, t, self.head_dim).reshape(b, -1, t, self.head_dim)
            v = v[:, :, None].expand(b, self.num_kv_heads, n_rep, t, self.head_dim).reshape(b, -1, t, self.head_dim)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # (B, H, S, T)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(mask.logical_not(), torch.finfo(scores.dtype).min)  # finite in fp16
        else:  # an additive float mask given by the caller, as stock Qwen2 takes it
            scores = scores + mask[..., : k.shape[2]].to(scores.dtype)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)  # (B, H, S, D)
        out = out.transpose(1, 2).reshape(b, s, -1)  # (B, S, H*D)
        return (self.o_proj(out), present, probs) if return_weights else (self.o_proj(out), present)


class Qwen2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None,
                **kwargs):
        """transformers 4.4x: -> (hidden_states,) + (attn_weights,) if output_attentions + (present,) if
        use_cache; the present is this layer's (key, value) for a tuple cache, else the Cache itself."""
        past = _cache_kwarg(past_key_value, kwargs)
        attn, weights, present = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask=attention_mask, position_ids=position_ids,
            past_key_value=past, output_attentions=output_attentions, position_embeddings=position_embeddings)
        h = hidden_states + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return (h,) + ((weights,) if output_attentions else ()) + ((present,) if use_cache else ())


class Qwen2PreTrainedModel(PreTrainedModel):
    config_class = Qwen2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Qwen2DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = False
    _supports_flash_attn_2 = False
    _supports_cache_class = True

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
        self.iter_num = int(getattr(config, "iter_num", 0))  # the vendor's graph switches, read once
        self.insert_slice = bool(getattr(config, "insert_slice", False))
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, iter_num=None, **kwargs):
        past = _cache_kwarg(past_key_values, kwargs)
        cache_position = kwargs.pop("cache_position", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Qwen2Model: pass exactly one of input_ids or inputs_embeds")
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        return_dict = _return_dict(cfg, return_dict)
        if isinstance(past, (tuple, list)) and len(past) == 0:
            past = None
        b, s = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        past_len = _past_length(past)
        device = (input_ids if inputs_embeds is None else inputs_embeds).device
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + s, dtype=torch.long, device=device)
        if position_ids is None:  # as stock: positions continue the cache (cache_position)
            start = torch.arange(past_len, past_len + s, device=device) if cache_position is None else cache_position
            position_ids = start[None].expand(b, -1)
        want_hidden = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        want_attn = cfg.output_attentions if output_attentions is None else output_attentions
        # optional arguments only when asked: export patches replace `core` by a 4-argument function
        extras = {k: v for k, v in (("inputs_embeds", inputs_embeds), ("all_hidden_states", [] if want_hidden
                                    else None), ("all_attentions", [] if want_attn else None)) if v is not None}
        hidden, presents = self.core(input_ids, attention_mask, position_ids, past, **extras)
        hidden_out, attn_out = extras.get("all_hidden_states"), extras.get("all_attentions")
        if (self.iter_num if iter_num is None else iter_num) == 0 and self.insert_slice:
            hidden = hidden[:, -1:, :]  # (B, 1, hidden): the vendor's prefill "strided_slice"
        if hidden_out is not None:
            hidden_out.append(hidden)
        out = BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_FIELD: presents if use_cache else None},
                                      hidden_states=None if hidden_out is None else tuple(hidden_out),
                                      attentions=None if attn_out is None else tuple(attn_out))
        return out if return_dict else out.to_tuple()

    def core(self, input_ids, attention_mask, position_ids, past_key_values=None, inputs_embeds=None,
             all_hidden_states=None, all_attentions=None):
        """The decoder stack: ids (B, S), 2-D mask (B, P+S) (or 4-D), positions (B, S), past None, tuples or a
        Cache -> (final-normed hidden (B, S, hidden), presents: tuples or the Cache). Lists given as
        `all_hidden_states` / `all_attentions` receive each layer's input / attention weights."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, hidden)
        head_dim = self.layers[0].self_attn.head_dim
        cos, sin = rotary_cos_sin(position_ids, head_dim, rope_theta(self.config), x.dtype)
        mask = attention_mask_4d(attention_mask, x.shape[1])
        is_cache = isinstance(past_key_values, Cache)
        presents = []
        for i, layer in enumerate(self.layers):
            if all_hidden_states is not None:
                all_hidden_states.append(x)
            past = past_key_values if is_cache or past_key_values is None else past_key_values[i]
            out = layer(x, attention_mask=mask, position_ids=position_ids, past_key_value=past,
                        output_attentions=all_attentions is not None, use_cache=True,
                        position_embeddings=(cos, sin))
            x = out[0]
            if all_attentions is not None:
                all_attentions.append(out[1])
            presents.append(out[-1])
        return self.norm(x), (past_key_values if is_cache else tuple(presents))


class Qwen2ForCausalLM(Qwen2PreTrainedModel, GenerationMixin):
    # transformers 5.x declares ties as {target: source}; 4.x as a list of tied names.
    _tied_weights_keys = (
        {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]
    )

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.vocab_size = config.vocab_size
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

    def get_decoder(self):
        return self.model

    def quantize(self, weight_bit_width=8, include_lm_head=False, empty=False):
        """Swap q/k/v/o/gate/up/down of every layer (and lm_head when asked) for per-channel W8A16 linears;
        returns self. `empty=True` allocates the int8 modules without computing (loading a quantized folder)."""
        _quantize(self, weight_bit_width, include_lm_head=include_lm_head, empty=empty)
        self.config.vacc_quantization = {
            "quant_method": QUANT_METHOD, "bits": weight_bit_width, "include_lm_head": include_lm_head,
        }
        return self

    if _TRANSFORMERS_MAJOR < 5:  # 5.x's GenerationMixin prepares inputs itself; 4.x's leaves it to the model
        def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                          inputs_embeds=None, cache_position=None, position_ids=None,
                                          use_cache=True, **kwargs):
            """One generate() step: the tokens not yet cached, positions counted over real tokens (left
            padding), the cache."""
            past_len = _past_length(past_key_values)
            if past_len:
                input_ids = input_ids[:, past_len:]  # (B, new)
            first_embeds = inputs_embeds is not None and past_len == 0
            if attention_mask is not None and position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
                position_ids = position_ids[:, -(inputs_embeds.shape[1] if first_embeds else input_ids.shape[1]):]
            return {"input_ids": None if first_embeds else input_ids,
                    "inputs_embeds": inputs_embeds if first_embeds else None, "past_key_values": past_key_values,
                    "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": use_cache,
                    "cache_position": cache_position}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, iter_num=None, **kwargs):
        """As transformers' Qwen2ForCausalLM.forward; logits (B, S, V), or (B, 1, V) in the prefill graph
        ("iter_num" 0) of a model built with `insert_slice`. `iter_num=` overrides the config's (our exporter
        uses it). With `labels` every position is kept, whatever the slice setting, so the loss is defined.
        `cache_position` (transformers 4.4x generate) is accepted as a keyword."""
        past = _cache_kwarg(past_key_values, kwargs)
        return_dict = _return_dict(self.config, return_dict)
        keep = kwargs.pop("logits_to_keep", kwargs.pop("num_logits_to_keep", 0))
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states, return_dict=True,
                         cache_position=kwargs.pop("cache_position", None),
                         iter_num=1 if labels is not None else iter_num)
        hidden = out.last_hidden_state
        if isinstance(keep, int) and keep > 0:
            hidden = hidden[:, -keep:, :]  # (B, keep, hidden)
        logits = self.lm_head(hidden)  # (B, S, V)
        loss = None
        if labels is not None:  # next-token cross entropy, -100 ignored, in fp32 (as stock)
            shift = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])  # (B*(S-1), V)
            loss = F.cross_entropy(shift, labels[:, 1:].reshape(-1).to(shift.device), ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: out[CACHE_FIELD]
                                                                      if CACHE_FIELD in out else None},
                                        hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()


__all__ = ["Qwen2Config", "Qwen2Model", "Qwen2ForCausalLM", "Qwen2PreTrainedModel", "QuantizedLinearPerChannel"]
