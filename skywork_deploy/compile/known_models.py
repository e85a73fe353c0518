"""Published Skywork-OR1 models as data, and the vamc configs generated from them (`build_in/build/`).

The values are those of each model's published config.json (REFERENCE.md §1), so a config can be written
without downloading the checkpoint; `frontend.checkpoint` is then a placeholder to replace with the patched
folder. The files carry no comment header, so the 7B ones are byte-identical to the vendor's published text
apart from the checkpoint; the 32B ones use tp 8 like the vendor's only 32B Qwen2 configs (QwQ-32B).
Regenerate the shipped files with:

    python -m skywork_deploy.compile.known_models --write build_in/build
"""
import argparse
import sys
from pathlib import Path

from ..base.fsutil import write_text
from ..base.spec import ModelSpec
from .config import build_config, dump_yaml
from .settings import DTYPES, CompileSettings, check_settings, raise_problems

_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
          "rms_norm_eps": 1e-06, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
          "use_sliding_window": False, "vocab_size": 152064, "max_position_embeddings": 131072}
_OR1_7B = {**_QWEN2, "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
           "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 10000.0}
_OR1_32B = {**_QWEN2, "num_hidden_layers": 64, "hidden_size": 5120, "intermediate_size": 27648,
            "num_attention_heads": 40, "num_key_value_heads": 8, "rope_theta": 1000000.0}

# name -> (hub id, config.json values that matter here, tp of the shipped configs)
KNOWN_MODELS = {
    "Skywork-OR1-7B-Preview": ("Skywork/Skywork-OR1-7B-Preview", _OR1_7B, 4),
    "Skywork-OR1-Math-7B": ("Skywork/Skywork-OR1-Math-7B", _OR1_7B, 4),
    "Skywork-OR1-32B-Preview": ("Skywork/Skywork-OR1-32B-Preview", _OR1_32B, 8),
}
PLACEHOLDER_ROOT = "/models"


def known_spec(name):
    if name not in KNOWN_MODELS:
        raise KeyError(f"{name}: not a known model (known: {', '.join(KNOWN_MODELS)})")
    hub_id, config, _ = KNOWN_MODELS[name]
    return ModelSpec.from_config(config, name=name, where=f"{hub_id} config.json")


def known_config_text(name, settings):
    """(build name, YAML text) for a published model, checked. Environment needs are in build_in/README.md."""
    spec = known_spec(name)
    raise_problems(check_settings(spec, settings), f"the config for {name}")
    config = build_config(spec, f"{PLACEHOLDER_ROOT}/{name}", settings)
    return config["name"], dump_yaml(config)


def known_configs():
    """{file name: YAML text} for every known model in fp16 and int8 with its published tp, 1024:2048."""
    out = {}
    for name, (_, _, tp) in KNOWN_MODELS.items():
        for dtype in DTYPES:
            config_name, text = known_config_text(name, CompileSettings(dtype=dtype, tp=tp))
            out[f"{config_name}.yaml"] = text
    return out


def write_known_configs(folder):
    """Write the configs into `folder`; returns the names of files that were created or changed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    changed = []
    for file_name, text in known_configs().items():
        path = folder / file_name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text(path, text)
            changed.append(file_name)
    return changed


def diff_known_configs(folder):
    """File names in `folder` that are missing, different or not generated (empty list: up to date)."""
    folder = Path(folder)
    expected = known_configs()
    present = {p.name for p in folder.glob("*.yaml")}
    bad = [n for n, text in expected.items()
           if not (folder / n).is_file() or (folder / n).read_text(encoding="utf-8") != text]
    return sorted(bad + sorted(present - set(expected)))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m skywork_deploy.compile.known_models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="DIR", help="write the configs into DIR")
    group.add_argument("--check", metavar="DIR", help="exit 1 if DIR differs from what would be generated")
    args = parser.parse_args(argv)
    if args.write:
        changed = write_known_configs(args.write)
        print(f"{len(changed)} file(s) written in {args.write}" + (f": {', '.join(changed)}" if changed else ""))
        return 0
    bad = diff_known_configs(args.check)
    if bad:
        print(f"{args.check} is out of date: {', '.join(bad)} (run with --write)", file=sys.stderr)
        return 1
    print(f"{args.check}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
