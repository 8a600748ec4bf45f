"""A pruned checkpoint holds exactly ``param_count(target)`` text parameters, for every family,
tied or not, and loads and generates with transformers."""

from __future__ import annotations

import pytest
import torch

import surgery_util as su
from cascadec.runtime.surgery import adapters
from cascadec.runtime.surgery.prune import prune
from cascadec.shapes import param_count


@pytest.mark.parametrize("family", su.FAMILIES)
@pytest.mark.parametrize("tie", ["untied", "tied", "tie-on-prune"])
def test_param_count_is_exact(tmp_path, family, tie):
    src = su.model(tmp_path, family, tied=tie == "tied")
    target = su.shape(src).replace(layers=3, hidden=48, ffn=80, heads=2, kv_heads=1,
                                   tied_embeddings=tie != "untied")
    report = prune(src, tmp_path / "out", stats=su.stats(src), target=target, methods=su.ALL_METHODS,
                   log=lambda m: None)
    assert report["params"] == param_count(target) == su.text_params(tmp_path / "out")
    assert su.shape(tmp_path / "out") == target


@pytest.mark.parametrize("family", ["qwen2", "mistral3"])
def test_pruned_model_generates(tmp_path, family):
    src = su.model(tmp_path, family)
    target = su.shape(src).replace(layers=2, hidden=32, ffn=64, heads=2, kv_heads=2)
    prune(src, tmp_path / "out", stats=su.stats(src), target=target,
          methods={**su.ALL_METHODS, "hidden": "channel"}, log=lambda m: None)
    model = adapters.load_model(tmp_path / "out", dtype=torch.float32)
    prompt = su.ids(1, 5)
    out = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    report = (tmp_path / "out" / "prune_report.json").read_text()
    assert '"kept"' in report
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert (tmp_path / "out" / "generation_config.json").is_file()


def test_shards_and_index(tmp_path):
    """Above the shard size the weights are split and indexed; transformers loads them."""
    src = su.model(tmp_path, "mistral")
    target = su.shape(src).replace(ffn=96)
    prune(src, tmp_path / "out", stats=su.stats(src), target=target, methods={"ffn": "activation"},
          max_shard_bytes=100_000, log=lambda m: None)
    files = sorted(p.name for p in (tmp_path / "out").glob("model*"))
    assert "model.safetensors.index.json" in files and len(files) > 3
    assert su.text_params(tmp_path / "out") == param_count(target)
    # the sharded output is itself a valid source
    prune(tmp_path / "out", tmp_path / "again", stats=su.stats(tmp_path / "out"), target=target,
          methods={}, log=lambda m: None)
    tokens = su.ids()
    assert torch.equal(su.logits(tmp_path / "again", tokens), su.logits(tmp_path / "out", tokens))


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral3"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bf16_checkpoint_prunes_to_bf16_exactly_counted_and_close(tmp_path, family, tied):
    """A bfloat16 source (as released checkpoints are) is cut in float32 and written back in
    bfloat16; a rotation without slicing then only adds bf16 rounding (KL to the source ~0)."""
    src = su.model(tmp_path, family, tied=tied, bf16=True)
    s = su.shape(src)
    target = s.replace(layers=3, hidden=48, ffn=80, heads=2, kv_heads=1)
    report = prune(src, tmp_path / "cut", stats=su.stats(src), target=target, methods=su.ALL_METHODS,
                   log=lambda m: None)
    assert report["params"] == param_count(target) == su.text_params(tmp_path / "cut")
    weights = adapters.load_model(tmp_path / "cut").state_dict()
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    rotated = prune(src, tmp_path / "rotated", stats=su.stats(src), target=s, methods={"hidden": "pca"},
                    log=lambda m: None)
    assert rotated["reconstruction"]["kl"] < 1e-3 and rotated["reconstruction"]["top1_agreement"] > 0.95
