"""Print the largest |ours - stock Qwen2| logit difference per config in this environment.

    python tests/vendor/measure_parity.py      # any venv with torch and transformers (no skywork_deploy)
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, Qwen2ForCausalLM  # noqa: E402

import drive  # noqa: E402
from folders import CONFIGS, dtype_kwarg, make_checkpoint, patch_folder  # noqa: E402


def main():
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in sorted(CONFIGS.items()):
            folder = patch_folder(make_checkpoint(Path(tmp) / name, **overrides))
            ours = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            ref = Qwen2ForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                   **dtype_kwarg(torch.float32)).eval()
            ids, mask, pos = drive.batch(ours.config.vocab_size)
            rows[name] = {
                "prefill": drive.prefill_diff(ours, ref, ids, mask, pos),
                "decode8_tuples": drive.decode_diff(ours, ref, ids, mask, pos),
                "decode8_dynamic_cache": drive.decode_diff(ours, ref, ids, mask, pos, cache=DynamicCache),
                "hidden_states": drive.hidden_states_diff(ours, ref, ids, mask),
                "generate_equal": drive.generate_equal(ours, ref, ids, mask),
            }
    worst = max(v for r in rows.values() for k, v in r.items() if k != "generate_equal")
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "max_abs_diff": worst, "configs": rows}, indent=1))


if __name__ == "__main__":
    main()
