"""`bench` on any bundle: prompts from the bundle's own vocabulary, defaults that fit its context, errors naming
options `bench` has, and a build folder moved since it was built still finding its reference in `patch/`
(runtime/bench.py, serve/loadgen.py, runtime/bundle.py's source chain). The model is the shipped demo (448-token
vocabulary, 512 positions), where Qwen-sized defaults used to fail."""
import json
import shutil

import pytest
from click.testing import CliRunner

from skywork_deploy.cli import cli


def _bench(*args):
    return CliRunner().invoke(cli, ["bench", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def moved_build(tmp_path_factory):
    """patch/ + export/ like a build folder, exported from patch/, then moved: the recorded paths are gone."""
    from skywork_deploy.demo_model import demo_model_path
    from skywork_deploy.export import export_model

    root = tmp_path_factory.mktemp("bench")
    shutil.copytree(demo_model_path(), root / "built" / "patch")
    export_model(root / "built" / "patch", root / "built" / "export", dtype="fp32", simplify=False)
    (root / "built").rename(root / "moved")
    return root / "moved"


def test_local_bench_fits_the_model_and_finds_the_reference_in_patch(moved_build):
    from skywork_deploy.runtime.bundle import load_tokenizer, open_bundle

    bundle = open_bundle(moved_build)
    assert bundle.source_model(float_only=True) == moved_build / "patch"
    tokenizer = load_tokenizer(bundle)
    ordinary = len(tokenizer) - len(tokenizer.get_added_vocab())  # the R1 specials are the added tokens
    result = _bench(moved_build, "--repeats", 1, "--new-tokens", 8, "--threads", 1, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["prompt_len"] for r in report["rows"]] == [128]  # 1,024 does not fit 512 positions
    assert report["reference"] and "decode_ratio" in report["rows"][0] and report["prompt_ids"] == ordinary < 448
    too_long = _bench(moved_build, "--prompt-len", 600)
    assert too_long.exit_code == 2 and "--prompt-len 600 + --new-tokens 64" in too_long.output
    assert "give --prompt-len 447 or less" in too_long.output and "--max-new-tokens" not in too_long.output


def test_serving_bench_local_and_endpoint_use_the_models_vocabulary(moved_build):
    from skywork_deploy.serve.server import start_in_thread

    local = _bench(moved_build, "--concurrency", 1, "--num-prompts", 1, "--output-len", 4, "--threads", 1, "--json")
    assert local.exit_code == 0, local.output
    assert json.loads(local.stdout)["input_len"] == 128
    running = start_in_thread(moved_build, threads=1)
    try:
        assert running.app.state.model_name == "moved"  # the folder the build started from is gone: its parent
        for extra in ([], ["--tokenizer", moved_build]):  # ids below the card's vocab_size; text from the tokenizer
            remote = _bench("--endpoint", running.url, "--concurrency", 1, "--num-prompts", 1, "--input-len", 16,
                            "--output-len", 3, "--json", *extra)
            assert remote.exit_code == 0, remote.output
            assert json.loads(remote.stdout)["rows"][0]["total_output_tokens"] == 3
        too_long = _bench("--endpoint", running.url, "--input-len", 500, "--output-len", 64)
        assert too_long.exit_code == 2 and "--input-len 500 + --output-len 64" in too_long.output
    finally:
        running.stop()
