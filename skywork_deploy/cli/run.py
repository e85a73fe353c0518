"""`skywork-deploy run`: thin CLI over skywork_deploy.runtime (generate text from a bundle)."""
import sys

import click

from .common import emit_json, handle_errors, json_option

BACKEND_NAMES = ("onnxruntime", "torch", "vacc")


def backend_options(fn):
    """Options shared by `run` and `bench`: backend choice, threads, int8 path."""
    fn = click.option("--int8-accuracy", type=click.Choice(["exact", "fast"]), default="exact", show_default=True,
                      help="int8 bundles on ONNX Runtime: exact = the vendor's W8A16 arithmetic at fp32 speed; "
                           "fast = MatMulNBits with int8 activations (faster, small error).")(fn)
    fn = click.option("--threads", type=click.IntRange(min=1), default=None,
                      help="CPU threads for the backend (default: the number of physical cores).")(fn)
    fn = click.option("--backend", type=click.Choice(BACKEND_NAMES), default="onnxruntime", show_default=True,
                      help="onnxruntime runs the exported graphs; torch our model from the source folder; "
                           "vacc the vendor runtime (needs vaststreamx and a card).")(fn)
    return fn


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("-p", "--prompt", "prompts", multiple=True, required=True,
              help="Prompt text; repeat for a left-padded batch (only the first one is streamed).")
@backend_options
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 = greedy; Skywork-OR1 is usually sampled at 0.6-1.0.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as raw text (no chat template).")
@json_option
@handle_errors
def run(bundle, prompts, backend, threads, int8_accuracy, max_new_tokens, temperature, top_p, seed,
        no_chat_template, as_json):
    """Generate text from BUNDLE and stream it to stdout; timing goes to stderr.

    BUNDLE is an `export` output folder (graphs, config, tokenizer), a `build` folder holding one, or, with
    --backend torch, a model folder. The prompt goes through the model's chat template (DeepSeek-R1's for
    Skywork-OR1, ending in `<think>`) unless --no-chat-template.

    \b
    Examples:
      skywork-deploy run ./or1-7b-onnx --prompt "What is 17 * 23?"
      skywork-deploy run ./or1-7b-onnx -p "Hi" --temperature 0.6 --top-p 0.95 --seed 1
      skywork-deploy run ./or1-7b-int8 -p "Hi" --int8-accuracy fast --threads 8 --json
      skywork-deploy run ./Skywork-OR1-7B-Preview -p "Hi" --backend torch
    """
    from ..runtime.backends import make_backend
    from ..runtime.bundle import load_tokenizer, open_bundle
    from ..runtime.generate import generate_text

    folder = open_bundle(bundle)
    tokenizer = load_tokenizer(folder)
    engine = make_backend(backend, folder, threads=threads, int8_accuracy=int8_accuracy)

    def stream(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate_text(engine, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed, chat_template=not no_chat_template,
                           on_text=None if as_json else stream)
    if as_json:
        emit_json(result)
        return
    sys.stdout.write("\n")
    for i, out in enumerate(result["outputs"][1:], start=2):
        click.echo(f"--- prompt {i} ---\n{out['text']}")
    t = result["timing"]
    decode = f"{t['decode_tokens_per_s']:.1f} tok/s" if t["decode_tokens_per_s"] else "n/a"
    click.echo(f"[{engine.name}] time to first token {t['time_to_first_token_s'] * 1000:.0f} ms; prefill "
               f"{t['prefill_tokens']} tokens at {t['prefill_tokens_per_s']:.1f} tok/s; decode {t['decode_steps']} "
               f"steps at {decode}; stop: {', '.join(o['stop_reason'] for o in result['outputs'])}", err=True)
