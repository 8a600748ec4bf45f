"""Architecture presets: every preset reproduces its publisher's parameter count, a spec can name
one (and override axes), the plan says where each shape came from, and an `arch` written beside a
local checkpoint is cross-checked against its config.json.
"""

from __future__ import annotations

import json

import pytest

from cascadec.presets import PRESETS
from cascadec.schema import family_schema
from cascadec.shapes import Shape, param_count
from compilerkit import cascadec

# (preset, published count, where it is published). The Hub's figure is the checkpoint's
# safetensors parameter total; Qwen3 0.6B and 1.7B store their tied head a second time in the
# file, so their Hub figure is the model's count plus vocab x hidden (checked as such below).
PUBLISHED = [
    ("mistral-small-3.1-24b", 23_572_403_200, "text model of mistralai/Mistral-Small-3.1-24B-Base-2503"),
    ("ministral-3-14b", 13_506_073_600, "Ministral 3 paper / model card: 13.5B LM + 0.4B vision"),
    ("ministral-3-8b", 8_489_553_920, "Ministral 3 configs (Megatron-Bridge docs: 8.4B)"),
    ("ministral-3-3b", 3_429_006_336, "Ministral 3 3B model card: 3.4B LM"),
    ("qwen3-0.6b", 596_049_920, "transformers num_parameters() of Qwen/Qwen3-0.6B (card: 0.6B, 0.44B non-embedding)"),
    ("qwen3-1.7b", 1_720_574_976, "Qwen/Qwen3-1.7B card: 1.7B, 1.4B non-embedding"),
    ("qwen3-4b", 4_022_468_096, "Hub safetensors total of Qwen/Qwen3-4B"),
    ("qwen3-8b", 8_190_735_360, "Hub safetensors total of Qwen/Qwen3-8B"),
    ("qwen3-14b", 14_768_307_200, "Hub safetensors total of Qwen/Qwen3-14B"),
    ("qwen3-32b", 32_762_123_264, "Hub safetensors total of Qwen/Qwen3-32B"),
    ("llama-3.1-8b", 8_030_261_248, "Hub safetensors total of meta-llama/Llama-3.1-8B"),
    ("llama-3.1-70b", 70_553_706_496, "Hub safetensors total of meta-llama/Llama-3.1-70B"),
    ("llama-3.2-1b", 1_235_814_400, "Hub safetensors total of meta-llama/Llama-3.2-1B"),
    ("llama-3.2-3b", 3_212_749_824, "Hub safetensors total of meta-llama/Llama-3.2-3B"),
    ("nemotron-4-15b", 15_628_775_424, "Nemotron-4 report: 3.2B embedding + 12.5B non-embedding"),
]
HUB_TOTAL_WITH_STORED_TIED_HEAD = {"qwen3-0.6b": 751_632_384, "qwen3-1.7b": 2_031_739_904}


def shape(name: str) -> Shape:
    arch = dict(PRESETS[name]["arch"])
    arch.pop("max_position_embeddings")
    return Shape(**arch)


def test_every_preset_has_a_published_count():
    assert sorted(PRESETS) == sorted(name for name, *_ in PUBLISHED)


@pytest.mark.parametrize("name, published, where", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_preset_reproduces_the_published_count(name, published, where):
    assert param_count(shape(name)) == published


@pytest.mark.parametrize("name", sorted(HUB_TOTAL_WITH_STORED_TIED_HEAD))
def test_tied_qwen3_hub_totals_count_the_head_twice(name):
    s = shape(name)
    assert s.tied_embeddings
    assert param_count(s) + s.vocab * s.hidden == HUB_TOTAL_WITH_STORED_TIED_HEAD[name]


def test_rounded_figures_of_the_cards():
    assert round(param_count(shape("qwen3-1.7b")) - 151936 * 2048, -8) == 1_400_000_000
    assert round(param_count(shape("qwen3-0.6b")) - 151936 * 1024, -7) == 440_000_000
    nemotron = shape("nemotron-4-15b")
    embedding = 2 * nemotron.vocab * nemotron.hidden
    assert (round(embedding, -8), round(param_count(nemotron) - embedding, -8)) == (3_100_000_000, 12_500_000_000)


def test_schema_offers_exactly_the_presets():
    arch = family_schema()["$defs"]["arch"]["properties"]
    assert arch["preset"]["enum"] == sorted(PRESETS)
    assert "q_norm/k_norm" in arch["family"]["description"]  # `family: qwen3` implies q/k norms


SPEC = """\
cascadec: 1
family: f
defaults:
  resources: {devices: 8, strategy: fsdp, precision: bf16, activation_checkpointing: true}
models:
  parent:
    source: {SOURCE}
    arch: {ARCH}
data:
  text: {kind: builtin, builtin: stdlib}
children:
  - name: child
    prune_from: parent
    shape: {layers: 18}
    pruning: {calibration: {data: text}}
    phases:
      - {name: short, teacher: parent, data: text, tokens: 1B, seq_len: 4096}
"""


def compile_spec(tmp_path, arch: str, source: str = "{hub: Qwen/Qwen3-8B}", fmt: str = "json"):
    spec = tmp_path / "f.yaml"
    spec.write_text(SPEC.replace("{ARCH}", arch).replace("{SOURCE}", source))
    return cascadec("plan", str(spec), "--format", fmt)


def test_a_spec_names_a_preset_and_the_plan_says_so(tmp_path):
    run = compile_spec(tmp_path, "{preset: qwen3-8b}")
    assert run.code == 0, run.err
    parent = json.loads(run.out)["models"]["parent"]
    assert parent["params"] == 8_190_735_360
    assert parent["shape"]["family"] == "qwen3" and parent["shape"]["layers"] == 36
    assert parent["provenance"] == {"shape": "preset:qwen3-8b (https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json)"}


def test_keys_beside_a_preset_override_it_and_are_recorded(tmp_path):
    run = compile_spec(tmp_path, "{preset: qwen3-8b, layers: 30}")
    assert run.code == 0, run.err
    parent = json.loads(run.out)["models"]["parent"]
    assert parent["shape"]["layers"] == 30 and parent["shape"]["hidden"] == 4096
    assert parent["provenance"]["shape.layers"] == "spec:models.parent.arch.layers"


def test_a_typed_arch_is_recorded_as_written(tmp_path):
    arch = "{family: qwen3, layers: 36, hidden: 4096, ffn: 12288, heads: 32, kv_heads: 8, head_dim: 128, vocab: 151936}"
    run = compile_spec(tmp_path, arch)
    assert run.code == 0, run.err
    assert json.loads(run.out)["models"]["parent"]["provenance"] == {"shape": "spec:models.parent.arch"}


def test_an_unknown_preset_is_a_located_error_with_a_suggestion(tmp_path):
    run = compile_spec(tmp_path, "{preset: qwen3-8B}")
    assert run.code != 0
    assert "f.yaml:8:20: error[CSC104]: models.parent.arch.preset is 'qwen3-8B', which is not one of:" in run.err
    assert "did you mean 'qwen3-8b'?" in run.err


QWEN3_8B_CONFIG = {"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 4096, "intermediate_size": 12288,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                   "tie_word_embeddings": False, "max_position_embeddings": 40960}


def local_checkpoint(tmp_path) -> str:
    (tmp_path / "qwen3-8b").mkdir()
    (tmp_path / "qwen3-8b" / "config.json").write_text(json.dumps(QWEN3_8B_CONFIG))
    return "{path: qwen3-8b}"


def test_a_local_config_is_read_when_no_arch_is_written(tmp_path):
    spec = tmp_path / "f.yaml"
    spec.write_text(SPEC.replace("    arch: {ARCH}\n", "").replace("{SOURCE}", local_checkpoint(tmp_path)))
    run = cascadec("plan", str(spec), "--format", "json")
    assert run.code == 0, run.err
    parent = json.loads(run.out)["models"]["parent"]
    assert parent["params"] == 8_190_735_360
    assert parent["provenance"] == {"shape": "config:qwen3-8b/config.json"}


def test_an_arch_that_agrees_with_the_local_config_passes(tmp_path):
    run = compile_spec(tmp_path, "{preset: qwen3-8b}", local_checkpoint(tmp_path))
    assert run.code == 0, run.err


def test_an_arch_that_disagrees_with_the_local_config_is_a_located_error(tmp_path):
    run = compile_spec(tmp_path, "{preset: qwen3-8b, hidden: 5120}", local_checkpoint(tmp_path), fmt="text")
    assert run.code != 0
    assert ("f.yaml:8:38: error[CSC240]: model 'parent': arch says hidden 5120, but qwen3-8b/config.json says 4096"
            in run.err)
    assert "= help: the checkpoint decides: remove `arch:` (its config.json is read), or write `hidden: 4096`" in run.err


def test_a_preset_that_disagrees_with_the_local_config_points_at_the_preset(tmp_path):
    run = compile_spec(tmp_path, "{preset: qwen3-4b}", local_checkpoint(tmp_path), fmt="text")
    assert run.code != 0
    assert "f.yaml:8:20: error[CSC240]: model 'parent': preset qwen3-4b gives layers 36, but" not in run.err
    assert "f.yaml:8:20: error[CSC240]: model 'parent': preset qwen3-4b gives hidden 2560, but qwen3-8b/config.json says 4096" in run.err
    assert "preset qwen3-4b gives tied_embeddings True" in run.err
