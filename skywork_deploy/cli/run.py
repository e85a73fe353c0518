"""`skywork-deploy run`: thin CLI over skywork_deploy.runtime (generate text from a bundle)."""
import sys

import click

from .common import PathArg, emit_json, finite_number, handle_errors, json_option, utf8_texts

BACKEND_NAMES = ("onnxruntime", "torch")


def backend_options(fn):
    """Options shared by `run` and `bench`: backend choice, threads, int8 path."""
    fn = click.option("--int8-accuracy", type=click.Choice(["exact", "fast"]), default="exact", show_default=True,
                      help="int8 bundles on ONNX Runtime: exact = the vendor's W8A16 arithmetic at fp32 speed; "
                           "fast = MatMulNBits with int8 activations (faster, small error).")(fn)
    fn = click.option("--threads", type=click.IntRange(min=1), default=None,
                      help="CPU threads for the backend (default: the number of physical cores).")(fn)
    fn = click.option("--backend", type=click.Choice(BACKEND_NAMES), default="onnxruntime", show_default=True,
                      help="onnxruntime runs the exported graphs; torch our model from the source folder "
                           "(a VACC build runs behind `skywork-deploy serve`: use --endpoint).")(fn)
    return fn


def endpoint_options(fn):
    """--endpoint URL [--model NAME] [--api-key KEY]: any OpenAI-compatible server instead of a bundle."""
    fn = click.option("--api-key", envvar="SKYWORK_DEPLOY_API_KEY", default=None,
                      help="Key for --endpoint (env SKYWORK_DEPLOY_API_KEY).")(fn)
    fn = click.option("--model", "model_name", default=None,
                      help="Model name at --endpoint (default: the first one it lists).")(fn)
    fn = click.option("--endpoint", default=None,
                      help="An OpenAI-compatible server (ours, vastgenx, vLLM), e.g. http://127.0.0.1:9900/v1.")(fn)
    return fn


def bundle_or_endpoint(bundle, endpoint):
    if (bundle is None) == (endpoint is None):
        raise click.UsageError("give either BUNDLE or --endpoint URL (one of them)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=PathArg("bundle", hub=False), required=False)
@click.option("-p", "--prompt", "prompts", multiple=True, required=True, callback=utf8_texts,
              help="Prompt text; repeat for a left-padded batch (only the first one is streamed).")
@backend_options
@endpoint_options
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, callback=finite_number,
              help="0 = greedy; Skywork-OR1 is usually sampled at 0.6-1.0.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              callback=finite_number)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the sampler.")
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as raw text (no chat template).")
@json_option
@handle_errors
def run(bundle, prompts, backend, threads, int8_accuracy, endpoint, model_name, api_key, max_new_tokens,
        temperature, top_p, seed, no_chat_template, as_json):
    """Generate text from BUNDLE (or --endpoint) and stream it to stdout; timing goes to stderr.

    BUNDLE is an `export` output folder (graphs, config, tokenizer), a `build` folder holding one, or, with
    --backend torch, a model folder. The prompt goes through the model's chat template (DeepSeek-R1's for
    Skywork-OR1, ending in `<think>`) unless --no-chat-template. With --endpoint URL the prompts go to an
    OpenAI-compatible server instead (chat completions, or completions with --no-chat-template), one
    request each.

    \b
    Examples:
      skywork-deploy run ./skywork-demo --prompt "What is 47 * 6?"
      skywork-deploy run ./or1-7b-onnx -p "Hi" --temperature 0.6 --top-p 0.95 --seed 1
      skywork-deploy run ./or1-7b-int8 -p "Hi" --int8-accuracy fast --threads 8 --json
      skywork-deploy run ./Skywork-OR1-7B-Preview -p "Hi" --backend torch
      skywork-deploy run --endpoint http://127.0.0.1:9900/v1 -p "What is 85 - 39?"
    """
    bundle_or_endpoint(bundle, endpoint)
    if endpoint:
        return run_endpoint(endpoint, model_name, api_key, list(prompts), max_new_tokens, temperature, top_p, seed,
                            no_chat_template, as_json)
    from ..runtime.backends import make_backend
    from ..runtime.bundle import load_tokenizer, open_bundle
    from ..runtime.generate import generate_text, precheck

    folder = open_bundle(bundle)
    tokenizer = load_tokenizer(folder)
    precheck(tokenizer, list(prompts), max_new_tokens, folder.spec.max_positions, not no_chat_template)  # exit 2
    engine = make_backend(backend, folder, threads=threads, int8_accuracy=int8_accuracy)

    result = generate_text(engine, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed, chat_template=not no_chat_template,
                           on_text=None if as_json else _stream)
    if _print_outputs(result, as_json):
        return
    t = result["timing"]
    decode = f"{t['decode_tokens_per_s']:.1f} tok/s" if t["decode_tokens_per_s"] else "n/a"
    click.echo(f"[{engine.name}] time to first token {t['time_to_first_token_s'] * 1000:.0f} ms; prefill "
               f"{t['prefill_tokens']} tokens at {t['prefill_tokens_per_s']:.1f} tok/s; decode {t['decode_steps']} "
               f"steps at {decode}; stop: {', '.join(o['stop_reason'] for o in result['outputs'])}", err=True)


def _stream(piece):
    sys.stdout.write(piece)
    sys.stdout.flush()


def _print_outputs(result, as_json):
    """The JSON result, or the answers after the first (streamed already); True when nothing more is printed."""
    if as_json:
        emit_json(result)
        return True
    sys.stdout.write("\n")
    for i, out in enumerate(result["outputs"][1:], start=2):
        click.echo(f"--- prompt {i} ---\n{out['text']}")
    return False


def run_endpoint(endpoint, model_name, api_key, prompts, max_new_tokens, temperature, top_p, seed,
                 no_chat_template, as_json):
    from ..serve.client import EndpointClient, generate_remote

    with EndpointClient(endpoint, model=model_name, api_key=api_key) as client:
        result = generate_remote(client, prompts, max_new_tokens, temperature, top_p, seed,
                                 chat=not no_chat_template, on_text=None if as_json else _stream)
    if _print_outputs(result, as_json):
        return
    t = result["timing"]
    click.echo(f"[{result['model']} at {result['endpoint']}] time to first token "
               f"{t['time_to_first_token_s'] * 1000:.0f} ms; {t['completion_tokens']} tokens in "
               f"{t['total_s']:.2f} s; stop: {', '.join(o['stop_reason'] for o in result['outputs'])}", err=True)
