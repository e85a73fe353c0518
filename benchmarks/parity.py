"""The parity table: our source_code/ Qwen2 against transformers' eager Qwen2ForCausalLM, per config.

Run it under each transformers version (the main environment, and the 4.45.2 venv of .ci/run):
    python benchmarks/parity.py                                  # appends to results/parity.json
    /tmp/skywork-deploy-ci-tf445/bin/python benchmarks/parity.py
    python benchmarks/parity.py --table                          # prints the markdown table of both

Max |diff| of fp32 logits, batch 2 with one left-padded row: prefill (every real position), prefill with
insert_slice (last position), 8 cached decode steps; and whether greedy generate gives identical tokens.
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "parity.json"
CONFIGS = {"gqa": {}, "tied": {"tie_word_embeddings": True}, "mha": {"num_key_value_heads": 4},
           "theta1e6": {"rope_theta": 1000000.0}}
DECODE_STEPS = 8


def batch(vocab, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=g)  # (B, S)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def measure(ours, ref):
    import torch

    vocab = ours.config.vocab_size
    ids, mask, pos = batch(vocab, 0)
    a = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    b = ours(ids, attention_mask=mask, position_ids=pos).logits
    prefill = (a - b)[mask.bool()].abs().max().item()
    ours.config.insert_slice = True
    b = ours(ids, attention_mask=mask, position_ids=pos, iter_num=0).logits
    ours.config.insert_slice = False
    sliced = (a[:, -1:] - b).abs().max().item()

    r = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    o = ours(ids, attention_mask=mask, position_ids=pos, iter_num=0)
    nxt, pos, decode = r.logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:], 0.0
    for _ in range(DECODE_STEPS):
        mask, pos = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), pos + 1
        r = ref(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=r.past_key_values,
                use_cache=True)
        o = ours(nxt, attention_mask=mask, position_ids=pos, past_key_values=o.past_key_values, iter_num=1)
        decode = max(decode, (r.logits - o.logits).abs().max().item())
        nxt = r.logits[:, -1].argmax(-1, keepdim=True)

    ids, mask, _ = batch(vocab, 3)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                        eos_token_id=None)
    same = bool(torch.equal(want, ours.generate(ids, attention_mask=mask, max_new_tokens=12)))
    return {"prefill": prefill, "insert_slice": sliced, "decode8": decode, "generate_identical": same}


def run():
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    from skywork_deploy.patch import patch_model
    from skywork_deploy.base.synth import make_random_qwen2

    major = int(transformers.__version__.split(".")[0])
    kwargs = {"attn_implementation": "eager", ("dtype" if major >= 5 else "torch_dtype"): torch.float32}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, overrides in CONFIGS.items():
            folder = make_random_qwen2(Path(tmp) / name, preset="tiny", tokenizer=False, **overrides)
            (folder / "vocab.json").write_text("{}")
            patch_model(folder, insert_slice=False)
            ours = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            ref = Qwen2ForCausalLM.from_pretrained(folder, **kwargs).eval()
            rows.append({"config": name, "transformers": transformers.__version__, **measure(ours, ref)})
            shutil.rmtree(folder)
    return rows


def table(rows):
    out = ["| config | transformers | prefill max diff | insert_slice max diff | 8 decode steps max diff "
           "| greedy generate |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["config"], r["transformers"])):
        out.append(f"| {r['config']} | {r['transformers']} | {r['prefill']:.1e} | {r['insert_slice']:.1e} | "
                   f"{r['decode8']:.1e} | {'identical' if r['generate_identical'] else 'DIFFERENT'} |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the stored table and exit")
    args = parser.parse_args()
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    if not args.table:
        rows = run()
        versions = {r["transformers"] for r in rows}
        stored = [r for r in stored if r["transformers"] not in versions] + rows
        RESULTS.write_text(json.dumps(stored, indent=1) + "\n")
    print(table(stored))
    return 0 if all(r["generate_identical"] and max(r["prefill"], r["decode8"]) <= 1e-5 for r in stored) else 1


if __name__ == "__main__":
    sys.exit(main())
