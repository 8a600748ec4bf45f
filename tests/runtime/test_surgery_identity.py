"""Pruning identities: a keep-everything prune, a rotation without slicing, and dropping a layer
whose residual branches are zero all leave the logits unchanged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import surgery_util as su
from cascadec.runtime.surgery import keep
from cascadec.runtime.surgery.prune import prune

TOL = 1e-5


@pytest.mark.parametrize("family", su.FAMILIES)
@pytest.mark.parametrize("hidden", ["pca", "channel"])
def test_full_size_prune_is_identity(tmp_path, family, hidden):
    """Every axis at full size, every method switched on: PCA rotates (no slice), the rest copy."""
    src = su.model(tmp_path, family)
    s = su.shape(src)
    methods = {**su.ALL_METHODS, "hidden": hidden}
    prune(src, tmp_path / "out", stats=su.stats(src), target=s, methods=methods, log=lambda m: None)
    tokens = su.ids()
    diff = (su.logits(tmp_path / "out", tokens) - su.logits(src, tokens)).abs().max()
    assert diff < TOL


@pytest.mark.parametrize("family", su.FAMILIES)
def test_rotation_without_slicing_is_identity_tied(tmp_path, family):
    """Tied head, final-norm gains spread around 1 and partly negative: the gain cannot fold into
    the matrix the head shares with the embedding, so the basis inside the kept subspace is
    aligned to it (keep.aligned_to_gain); at full width that is exact for any gain."""
    src = su.model(tmp_path, family, tied=True)
    prefix = su.adapters.for_config(su.adapters.read_config(src)).prefix
    final = load_file(src / "model.safetensors")[f"{prefix}norm.weight"]
    assert final.min() < 0 < final.max() and final.std() > 0.5  # the fixture is not unit gains
    prune(src, tmp_path / "out", stats=su.stats(src), target=su.shape(src), methods={"hidden": "pca"},
          log=lambda m: None)
    tokens = su.ids()
    assert (su.logits(tmp_path / "out", tokens) - su.logits(src, tokens)).abs().max() < TOL


def test_rotation_folds_norm_gains(tmp_path):
    """After a PCA rotation the norm weights are constants: the gains live in the linears."""
    src = su.model(tmp_path, "mistral")
    prune(src, tmp_path / "out", stats=su.stats(src), target=su.shape(src), methods={"hidden": "pca"},
          log=lambda m: None)
    t = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.allclose(t["model.layers.0.input_layernorm.weight"], torch.ones(64))
    assert torch.allclose(t["model.norm.weight"], torch.ones(64))


def zero_branches(layer: int, prefix: str = "model."):
    def fn(t):
        t[f"{prefix}layers.{layer}.self_attn.o_proj.weight"].zero_()
        t[f"{prefix}layers.{layer}.mlp.down_proj.weight"].zero_()
    return fn


@pytest.mark.parametrize("method", sorted(keep.METHODS["layers"]))
def test_dropping_a_zeroed_layer_keeps_logits(tmp_path, method):
    """Every layer criterion drops the identity layer first, and dropping it changes nothing."""
    src = su.edit(su.model(tmp_path, "mistral"), zero_branches(2))
    s = su.shape(src)
    report = prune(src, tmp_path / "out", stats=su.stats(src), target=s.replace(layers=3),
                   methods={"layers": method}, log=lambda m: None)
    assert report["kept"]["layers"]["kept"] == [0, 1, 3]
    tokens = su.ids()
    assert (su.logits(tmp_path / "out", tokens) - su.logits(src, tokens)).abs().max() < TOL
