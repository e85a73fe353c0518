"""Train the demo model from scratch: `python -m skywork_deploy.demo_model.train --out DIR [--seed N]`.

A tiny Qwen2 (transformers' Qwen2ForCausalLM: GQA, q/k/v bias) learns the synthetic arithmetic problems of
`problems.py`, written as Skywork-OR1 answers in DeepSeek-R1's chat template. Seeded and single-process:
the same seed and thread count give the same weights. The loss is taken on the assistant turn only. Writes
config.json, model.safetensors, generation_config.json, the tokenizer files and training_log.json (loss
curve, held-out Math-Verify accuracy, time, seed) into DIR through a temporary folder.
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

from ..base.synth import BOS, EOS
from . import problems as P
from .tokenizer import render_prompt, save_tokenizer, train_tokenizer

ARCH = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
            rms_norm_eps=1e-6, use_sliding_window=False)
TOKENIZER_VOCAB = 448
VOCAB_ROWS = 448  # embedding rows: the tokenizer's vocabulary (a multiple of 64)
SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}  # Skywork-OR1's recommended sampling


def training_text(problem, phrase):
    return render_prompt(problem.prompt(phrase)) + P.solution(problem) + EOS


def corpus(seed, n=6000):
    rng = random.Random(seed)
    train = P.split(heldout=False)
    return [training_text(p, rng.randrange(len(P.PHRASES))) for p in rng.sample(train, n)]


def encode_batch(tok, items, pad_id):
    """(problem, phrase) pairs -> input_ids, labels (B, S) int64; labels -100 on the prompt and padding."""
    import torch

    rows = []
    for problem, phrase in items:
        prompt = tok.encode(render_prompt(problem.prompt(phrase)), add_special_tokens=False).ids
        answer = tok.encode(P.solution(problem) + EOS, add_special_tokens=False).ids
        rows.append((prompt, answer))
    length = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        seq = prompt + answer
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(prompt):len(seq)] = torch.tensor(answer)
    return ids, labels


def greedy_accuracy(model, tok, records, max_new_tokens=64, batch=50):
    """Greedy answers to held-out records scored with Math-Verify -> (accuracy, list of (text, status))."""
    import torch

    from ..evaluate.scoring import CORRECT, score

    eos = tok.token_to_id(EOS)
    results = []
    model.eval()
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        encoded = [tok.encode(render_prompt(r["problem"]), add_special_tokens=False).ids for r in chunk]
        length = max(len(e) for e in encoded)
        ids = torch.full((len(chunk), length), eos, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, e in enumerate(encoded):  # left padding
            ids[i, length - len(e):] = torch.tensor(e)
            mask[i, length - len(e):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos)
        for r, row in zip(chunk, out[:, length:].tolist()):
            text = tok.decode([t for t in row if t != eos], skip_special_tokens=False)
            results.append((text, score(text, r["answer"])[0]))
    model.train()
    return sum(s == CORRECT for _, s in results) / max(len(results), 1), results


def lr_factor(step, steps, warmup):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    return min((step + 1) / warmup, cosine)


def heldout_records(n=200, seed=1234):
    rng = random.Random(seed)
    return [P.as_record(p, rng.randrange(len(P.PHRASES))) for p in P.sample(n, seed, heldout=True)]


def train(out, seed=0, steps=1500, batch_size=32, lr=3e-3, threads=1, eval_every=250, heldout_problems=200,
          probe_problems=60, init_from=None, log=print):
    """Train (from scratch, or on from the model in `init_from` for a second phase) and save into `out`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from ..base.fsutil import atomic_output_dir

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    previous = None
    if init_from:  # a second phase: the same tokenizer and weights, a fresh schedule and data stream
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(init_from) / "tokenizer.json"))
        model = Qwen2ForCausalLM.from_pretrained(str(init_from), dtype=torch.float32).train()
        previous = json.loads((Path(init_from) / "training_log.json").read_text())
        previous.get("heldout", {}).pop("wrong_examples", None)
    else:
        tok = train_tokenizer(corpus(seed), TOKENIZER_VOCAB)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if not init_from:
        cfg = Qwen2Config(**ARCH, vocab_size=VOCAB_ROWS, bos_token_id=bos, eos_token_id=eos)
        model = Qwen2ForCausalLM(cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    rng = random.Random(seed + 1 + (1000 if init_from else 0))
    train_set = P.split(heldout=False)
    by_op = {op: [p for p in train_set if p.op == op] for op in P.OPS}
    probe = heldout_records(probe_problems, seed=99)
    curve, evals = [], []
    for step in range(1, steps + 1):
        items = [(rng.choice(by_op[P.OPS[i % 3]]), rng.randrange(len(P.PHRASES))) for i in range(batch_size)]
        ids, labels = encode_batch(tok, items, eos)
        loss = model(input_ids=ids, labels=labels).loss  # mean over assistant tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            elapsed = time.perf_counter() - t0
            curve.append({"step": step, "loss": round(loss.item(), 5), "time_s": round(elapsed, 1)})
            log(f"step {step}/{steps} loss {loss.item():.4f} ({elapsed:.0f} s)")
        if step % eval_every == 0 or step == steps:
            acc, _ = greedy_accuracy(model, tok, probe)
            evals.append({"step": step, "probe_accuracy": acc})
            log(f"step {step}: probe accuracy {acc:.3f}")
    train_s = time.perf_counter() - t0
    records = heldout_records(heldout_problems)
    acc, results = greedy_accuracy(model, tok, records)
    log(f"held-out Math-Verify accuracy (greedy, fp32): {acc:.4f} on {len(records)} problems")
    out = Path(out)
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tok, tmp)
        GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **SAMPLING).save_pretrained(str(tmp))
        log_doc = {
            "format_version": 1, "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
            "threads": threads, "train_time_s": round(train_s, 1), "architecture": ARCH,
            "vocab_rows": VOCAB_ROWS, "tokenizer_vocab": tok.get_vocab_size(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__, "loss_curve": curve, "probe_evals": evals,
            "total_train_time_s": round(train_s + (previous or {}).get("total_train_time_s", 0), 1),
            "previous_phase": previous,
            "heldout": {"problems": len(records), "accuracy_greedy_fp32": acc, "scorer": "math-verify",
                        "wrong_examples": [{"problem": r["problem"], "response": t, "status": s}
                                           for r, (t, s) in zip(records, results) if s != "correct"][:10]},
        }
        (tmp / "training_log.json").write_text(json.dumps(log_doc, indent=1) + "\n", encoding="utf-8")
    return log_doc


def write_heldout(path, n=200, seed=1234):
    lines = [json.dumps(r) for r in heldout_records(n, seed)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to write the trained model into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heldout-out", default=None, help="also write the held-out problems (JSONL) here")
    ap.add_argument("--init-from", default=None, help="continue from this trained folder (a second phase)")
    args = ap.parse_args(argv)
    if args.heldout_out:
        write_heldout(args.heldout_out)
    doc = train(args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                threads=args.threads, init_from=args.init_from)
    print(f"wrote {args.out}: {doc['parameters']} parameters, {doc['train_time_s']} s, "
          f"held-out accuracy {doc['heldout']['accuracy_greedy_fp32']:.4f}")


if __name__ == "__main__":
    main()
