"""Drive a model the way Hugging Face-consuming toolchains do, and compare with stock Qwen2.

Each function takes our model (loaded with trust_remote_code) and/or transformers' eager Qwen2ForCausalLM
on the same weights and returns the largest absolute difference it saw (callers compare it with their
tolerance). Only torch and transformers are imported: these run in the vendor venv and the main one.
"""
import torch


def batch(vocab, seed=0, b=2, s=9, pad=4):
    """(input_ids, attention_mask, position_ids), row 1 left-padded by `pad`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@torch.no_grad()
def prefill_diff(ours, ref, ids, mask, pos):
    a = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    b = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b)[mask.bool()].abs().max().item()


@torch.no_grad()
def decode_diff(ours, ref, ids, mask, pos, steps=8, cache=None):
    """Prefill, then `steps` cached decode steps fed the reference's greedy tokens. `cache`: None for legacy
    tuples, or a factory of an empty Cache for ours (DynamicCache)."""
    ref_out = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    our_past = None if cache is None else cache()
    our_out = ours(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=our_past, use_cache=True)
    worst = (ref_out.logits - our_out.logits)[mask.bool()].abs().max().item()
    for _ in range(steps):
        nxt = ref_out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        ref_out = ref(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=ref_out.past_key_values,
                      use_cache=True)
        our_in = our_out.past_key_values
        our_out = ours(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=our_in, use_cache=True)
        if cache is None:
            assert isinstance(our_out.past_key_values, tuple) and isinstance(our_out.past_key_values[0], tuple)
        else:
            assert our_out.past_key_values is our_in  # the same Cache object, updated in place
        worst = max(worst, (ref_out.logits - our_out.logits).abs().max().item())
    return worst


@torch.no_grad()
def generate_equal(ours, ref, ids, mask, new_tokens=10):
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return torch.equal(ref.generate(ids, **kw), ours.generate(ids, **kw))


@torch.no_grad()
def gptq_replay_diff(ours, ids, mask):
    """As AutoGPTQ/GPTQModel: catch layer 0's positional and keyword inputs with a pre-hook that raises, then
    run every decoder layer with them; the result must equal the model's own hidden states."""
    caught = {}

    class Stop(Exception):
        pass

    def hook(module, args, kwargs):
        caught["args"], caught["kwargs"] = args, kwargs
        raise Stop

    layers = ours.model.layers
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ours(input_ids=ids, attention_mask=mask, use_cache=False)
    except Stop:
        pass
    finally:
        handle.remove()
    x, kwargs = caught["args"][0] if caught["args"] else caught["kwargs"].pop("hidden_states"), caught["kwargs"]
    for layer in layers:
        out = layer(x, *caught["args"][1:], **kwargs)
        assert isinstance(out, tuple), type(out)
        x = out[0]
    expected = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    want = expected.hidden_states[-1]
    got = ours.model.norm(x)
    if want.shape[1] != got.shape[1]:  # the prefill slice keeps the last position only
        got = got[:, -want.shape[1]:]
    return (want - got).abs().max().item()


@torch.no_grad()
def hidden_states_diff(ours, ref, ids, mask):
    a = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    b = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(a) == len(b) == ref.config.num_hidden_layers + 1, (len(a), len(b))
    keep = mask.bool()
    return max((x - y)[keep].abs().max().item() for x, y in zip(a, b))


@torch.no_grad()
def loss_diff(ours, ref, ids):
    a, b = ref(input_ids=ids, labels=ids).loss, ours(input_ids=ids, labels=ids).loss
    assert b.dim() == 0 and torch.isfinite(b)
    return abs(a.item() - b.item())


@torch.no_grad()
def inputs_embeds_diff(ours, ref, ids, mask):
    embeds = ref.get_input_embeddings()(ids)  # (B, S, hidden)
    a = ref(inputs_embeds=embeds, attention_mask=mask).logits
    b = ours(inputs_embeds=embeds, attention_mask=mask).logits
    return (a - b)[mask.bool()].abs().max().item()


@torch.no_grad()
def jit_trace_diff(cls, config, state, ids, mask, pos):
    """torch.jit.trace of the prefill (config iter_num 0, insert_slice) and decode (iter_num 1) models built
    from configs; each traced module must equal its eager model on inputs other than the traced ones."""
    worst = 0.0
    for iter_num in (0, 1):
        cfg = config.__class__.from_dict({**config.to_dict(), "iter_num": iter_num, "insert_slice": True,
                                          "torchscript": True})
        model = cls(cfg).eval()
        model.load_state_dict(state, strict=False)
        if iter_num == 0:
            args = (ids, mask, pos)
        else:
            _, past = model(ids, mask, pos)[:2]
            step_mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], dim=1)
            args = (ids[:, -1:], step_mask, pos[:, -1:] + 1, past)
        traced = torch.jit.trace(model, args, check_trace=False)
        other = ((args[0] + 1) % cfg.vocab_size,) + args[1:]
        logits, eager = traced(*other)[0], model(*other)[0]
        assert logits.shape[1] == 1, logits.shape  # iter0 sliced by the config, iter1 one token
        worst = max(worst, (logits - eager).abs().max().item())
    return worst
