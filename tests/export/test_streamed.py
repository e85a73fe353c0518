"""Layer-streamed ONNX Runtime validation: the cut is the graph, and streamed runs give the whole runs' logits."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from skywork_deploy.cli import cli
from skywork_deploy.export import pieces, streamed, validate, verify

LAYERS = 3


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    """3 decoder layers (so one piece holds a middle layer), 1,024-row vocabulary."""
    return tiny_model_factory("gqa", tokenizer=True, vocab_size=1024, num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def bundles(model, tiny_model_factory, tmp_path_factory):
    from skywork_deploy.export import export_model

    root = tmp_path_factory.mktemp("streamed")
    tied = tiny_model_factory("tied", tokenizer=True, vocab_size=1024, num_hidden_layers=LAYERS)
    made = {}
    for name, src, kw in (("fp32", model, {}), ("fp16", model, {"dtype": "fp16"}),
                          ("int8", model, {"dtype": "int8"}), ("onnx-ops", model, {"ort_ops": "onnx"}),
                          ("tied", tied, {})):
        made[name] = (root / name, export_model(src, root / name, simplify=False, validation="whole", **kw))
    return made


def _graphs(bundles):
    for name, (out, _) in bundles.items():
        for path in sorted(out.glob("*.onnx")):
            yield f"{name}/{path.name}", onnx.load(str(path), load_external_data=False)


def test_every_node_is_in_exactly_one_piece_and_constants_are_copied(bundles):
    for where, proto in _graphs(bundles):
        cut = pieces.cut(proto)
        constants = pieces.constant_nodes(proto)
        assert [p.name for p in cut] == ["embed"] + [f"layer {i}" for i in range(LAYERS)] + ["head"], where
        owners = {}
        for p in cut:
            assert set(p.constants) <= constants and set(p.constants) <= set(p.nodes), where
            for i in set(p.nodes) - set(p.constants):
                owners.setdefault(i, []).append(p.name)
        assert sorted(owners) == sorted(set(range(len(proto.graph.node))) - constants), where
        assert all(len(names) == 1 for names in owners.values()), where
        # a decoder layer's weights are read by its own piece only
        for p in cut[1:-1]:
            layer = int(p.name.split()[1])
            read = {x for i in p.nodes for x in proto.graph.node[i].input}
            tagged = {int(m.group(1)) for x in read if (m := pieces.LAYER.search(x))}
            assert tagged <= {layer, layer + 1}, (where, p.name, tagged)  # + 1: the next layer's input norm


def test_boundary_tensors_are_exactly_those_crossing_pieces(bundles):
    for where, proto in _graphs(bundles):
        cut = pieces.cut(proto)
        graph_inputs = {v.name for v in proto.graph.input}
        owner = {o: k for k, p in enumerate(cut) for i in set(p.nodes) - set(p.constants)
                 for o in proto.graph.node[i].output}
        crossing = {}  # tensor -> pieces reading it that did not make it, from the nodes alone
        for k, p in enumerate(cut):
            for i in p.nodes:
                for x in proto.graph.node[i].input:
                    if x in owner and owner[x] != k:
                        crossing.setdefault(x, set()).add(k)
        handed = {x: {k for k, p in enumerate(cut) if x in p.inputs} for p in cut for x in p.inputs
                  if x not in graph_inputs}
        assert handed == crossing, where
        for x, readers in crossing.items():
            assert min(readers) > owner[x] and x in cut[owner[x]].outputs, (where, x)
        assert {n for p in cut for n in p.outputs if n in {o.name for o in proto.graph.output}} == \
            {o.name for o in proto.graph.output}, where
        levels = pieces.levels(proto)
        assert set(pieces.crossing_tensors(proto, levels)) == set(crossing), where
        # the layers hand on the hidden state (a pair with the residual in the contrib graphs), not weights
        initializers = {t.name for t in proto.graph.initializer}
        assert not set(crossing) & initializers and all(len(p.inputs) <= 12 for p in cut), where


def _chains(bundle, variant, options, float_np, layers, low_memory):
    paths = verify.mode_paths(bundle, variant)
    ids, mask, forced = validate.make_inputs(1024, validate.PROMPT_LEN)
    whole, whole_bad = validate.run_chain(*paths, LAYERS, 1024, validate.PROMPT_LEN, options, float_np,
                                          low_memory=low_memory)
    part, part_bad = streamed.run_chain(*paths, ids, mask, forced, options, float_np, layers, low_memory=low_memory)
    assert len(part) == len(whole) == 1 + validate.DECODE_STEPS and whole_bad == part_bad == [False] * len(whole)
    return max(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) for a, b in zip(whole, part))


@pytest.mark.parametrize("name,variant,options", [
    ("fp32", None, validate.FAST), ("fp16", None, validate.FAST), ("onnx-ops", None, validate.FAST),
    ("tied", None, validate.FAST), ("int8", "nbits-exact", validate.EXACT), ("int8", None, validate.UNFUSED),
    ("int8", "nbits", validate.FAST)])
def test_streamed_logits_equal_whole_session_logits(bundles, name, variant, options):
    """Same kernels on the same inputs: streamed and whole agree to 1e-6 (in fact bit for bit here), for one
    layer a piece and for two (a group and a single layer)."""
    out, _ = bundles[name]
    float_np = "float16" if name == "fp16" else "float32"
    for layers in (1, 2):
        assert _chains(out, variant, options, float_np, layers, low_memory=name != "int8") <= 1e-6


def test_export_validation_streamed_is_recorded_with_the_same_rows(model, bundles, tmp_path):
    out = tmp_path / "int8-streamed"
    result = CliRunner().invoke(cli, ["export", str(model), "-o", str(out), "--dtype", "int8", "--no-simplify",
                                      "--validation", "streamed"])
    assert result.exit_code == 0, result.output
    assert "int8 ort exact: layer-streamed" in result.output and "peak RSS" in result.output
    report = json.loads((out / "validation.json").read_text())
    whole = bundles["int8"][1]["validation"]
    assert report["passed"] and report["validation"] == "streamed"
    assert [(r["mode"], r["step"]) for r in report["rows"]] == [(r["mode"], r["step"]) for r in whole["rows"]]
    for a, b in zip(report["rows"], whole["rows"]):
        assert a["max_abs_diff"] == pytest.approx(b["max_abs_diff"], abs=1e-6) and a["ok"] == b["ok"]
    runs = json.loads((out / "skywork_deploy_manifest.json").read_text())["validation"]["runs"]
    assert set(runs) == {"int8 ort exact", "int8 ort unfused", "int8 ort fast"}
    for run in runs.values():
        assert run["how"] == "streamed" and run["layers_per_piece"] >= 1 and run["peak_rss_bytes"] > 0
        assert run["seconds"] > 0 and run["estimate_bytes"] > 0
    assert all(r["how"] == "whole" for r in whole["runs"].values())


def test_auto_streams_only_when_the_whole_session_does_not_fit(bundles):
    """The memory policy decides: a whole session estimated beyond the budget runs streamed, whose estimate is
    the largest piece plus what is held between pieces; when neither fits the mode is skipped with the reason."""
    from skywork_deploy.base.memory import graph_weights

    out, _ = bundles["fp16"]
    paths = verify.mode_paths(out, None)
    sizes = graph_weights(paths[0])
    data = (out / "model.onnx.data").stat().st_size
    run, why = verify.choose_run("auto", paths, sizes, data, validate.FAST, False, 1 << 20, available=4 << 30)
    assert run["how"] == "whole" and why is None
    huge = 30 << 30  # a 7B fp16 bundle's data file: the whole session needs about 30 GiB
    run, why = verify.choose_run("auto", paths, sizes, huge, validate.FAST, False, 1 << 20, available=4 << 30)
    assert run["how"] == "streamed" and "does not fit" in run["choice"] and run["estimate_bytes"] < 1 << 30
    assert run["whole_estimate_bytes"] > 30 << 30
    run, why = verify.choose_run("whole", paths, sizes, huge, validate.FAST, False, 1 << 20, available=4 << 30)
    assert run is None and "needs about" in why
    run, why = verify.choose_run("auto", paths, sizes, huge, validate.FAST, False, 1 << 20, available=1 << 20)
    assert run is None and "layer-streamed" in why
    group, need = streamed.plan(paths, validate.FAST, False, 0, layers=2)
    assert group == 2 and need > 0


def test_layers_per_piece_follows_the_largest_unsplittable_piece(bundles):
    out, _ = bundles["fp32"]
    paths = verify.mode_paths(out, None)
    estimates = streamed.piece_estimates(paths[0], validate.FAST, False)
    assert len(estimates) == LAYERS + 2  # embed, each layer, head
    group, need = streamed.plan(paths, validate.FAST, False, 1000)
    from skywork_deploy.base.memory import OVERHEAD

    layer = max(estimates[1:-1]) - OVERHEAD
    fixed = max(estimates[0], estimates[-1]) - OVERHEAD
    assert group == max(1, int(fixed // layer)) and need >= max(estimates) + 1000


def test_validation_option_is_checked(model, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(model), "-o", str(tmp_path / "x"), "--validation", "half"])
    assert result.exit_code == 2 and not (tmp_path / "x").exists()
    from skywork_deploy.base.errors import ConfigError
    from skywork_deploy.export import export_model
    from skywork_deploy.pipeline import BuildSettings

    with pytest.raises(ConfigError, match="--validation half"):
        export_model(model, tmp_path / "y", validation="half")
    settings = BuildSettings.from_yaml("model: m\ndtype: fp16\nexport:\n  validation: streamed\n")
    assert settings.export.validation == "streamed"
    settings.export.validation = "sometimes"
    with pytest.raises(ConfigError, match="export.validation"):
        settings.check()


def test_a_mismatch_is_reported_with_its_table_and_the_bundle_kept(tiny_model_factory, tmp_path):
    """A tied config whose checkpoint still carries its own lm_head.weight: transformers ties the head to the
    embedding, the export reads the stray tensor, and validation fails. The CLI says so with the table (not a
    missing temporary folder), OUT is not made and the bundle is kept in OUT.failed."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "tied"
    shutil.copytree(tiny_model_factory("tied", tokenizer=True, vocab_size=1024), src)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(str(shard))
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["export", str(src), "-o", str(out), "--no-simplify", "--validation", "streamed"])
    assert result.exit_code == 1 and "do not match the reference" in result.output and "NO" in result.output
    assert not out.exists() and (tmp_path / "bundle.failed" / "validation.json").is_file()
