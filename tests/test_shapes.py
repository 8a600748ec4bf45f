"""Pass-independent arithmetic: exact parameter counts of published models, and the shape solver.

The published figures are the contract (Ministral 3 paper, HF configs, Minitron paper); the
solver must be deterministic, stay within tolerance, keep fixed axes and multiples, and say
None instead of guessing when a target is unreachable.
"""

from __future__ import annotations

import itertools

import pytest

from cascadec.shapes import Shape, from_hf_config, param_count, solve

SMALL_31 = Shape(family="mistral3", layers=40, hidden=5120, ffn=32768, heads=32, kv_heads=8, head_dim=128,
                 vocab=131072, tied_embeddings=False)
MINISTRAL_14B = SMALL_31.replace(ffn=16384)
MINISTRAL_8B = SMALL_31.replace(layers=34, hidden=4096, ffn=14336)
MINISTRAL_3B = SMALL_31.replace(layers=26, hidden=3072, ffn=9216, tied_embeddings=True)
NEMOTRON_15B = Shape(family="nemotron", layers=32, hidden=6144, ffn=24576, heads=48, kv_heads=8, head_dim=128,
                     vocab=256000, tied_embeddings=False)


def swiglu_params(s: Shape) -> int:
    """The count written out independently of `shapes.py`: q,k,v,o + gate,up,down + 2 RMSNorms per
    layer, embeddings (+ an untied head), final norm."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    layer = s.hidden * q + 2 * s.hidden * kv + q * s.hidden + 3 * s.hidden * s.ffn + 2 * s.hidden
    return s.layers * layer + s.vocab * s.hidden * (1 if s.tied_embeddings else 2) + s.hidden


@pytest.mark.parametrize("shape, published", [
    (SMALL_31, 23_572_403_200),
    (MINISTRAL_14B, 13_506_073_600),
    (MINISTRAL_8B, 8_489_553_920),
    (MINISTRAL_3B, 3_429_006_336),
], ids=["mistral-small-3.1", "ministral-3-14b", "ministral-3-8b", "ministral-3-3b"])
def test_ministral3_counts_are_exact(shape, published):
    assert param_count(shape) == published
    assert swiglu_params(shape) == published


def test_nemotron_family_counts():
    """Nemotron-4 15B (squared-ReLU MLP: two matrices; LayerNorms with bias) and Minitron's 8B/4B."""
    minitron_8b = NEMOTRON_15B.replace(hidden=4096, ffn=16384)
    minitron_4b = NEMOTRON_15B.replace(hidden=3072, ffn=9216, heads=24)
    counts = [param_count(s) for s in (NEMOTRON_15B, minitron_8b, minitron_4b)]
    assert counts == [15_628_775_424, 8_271_699_968, 4_190_509_056]
    # the paper's rounded figures: 15.6B, 8.3B, 4.2B
    assert [round(c / 1e9, 1) for c in counts] == [15.6, 8.3, 4.2]
    # two MLP matrices, not three: the MLP is a third smaller than a SwiGLU of the same width
    h, f = NEMOTRON_15B.hidden, NEMOTRON_15B.ffn
    assert param_count(NEMOTRON_15B) - param_count(NEMOTRON_15B.replace(ffn=f - 1)) == 2 * h * NEMOTRON_15B.layers


def test_family_specific_terms():
    base = SMALL_31.replace(family="mistral")
    q, kv = base.heads * base.head_dim, base.kv_heads * base.head_dim
    assert param_count(base.replace(family="qwen2")) - param_count(base) == base.layers * (q + 2 * kv)
    assert param_count(base.replace(family="qwen3")) - param_count(base) == base.layers * 2 * base.head_dim
    assert param_count(base.replace(family="llama")) == param_count(base) == param_count(SMALL_31)


def test_from_hf_config_reads_the_text_tower():
    config = {"model_type": "mistral3", "tie_word_embeddings": False, "text_config": {
        "num_hidden_layers": 40, "hidden_size": 5120, "intermediate_size": 32768, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072}}
    assert from_hf_config(config) == SMALL_31
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        from_hf_config({"model_type": "gpt2"})


# -- solve ------------------------------------------------------------------------------------

MULTIPLES = {"hidden": 256, "ffn": 256}


def _solve(target, *, fixed=None, axes=("layers", "hidden", "ffn"), tolerance=0.02, multiple_of=MULTIPLES,
           source=MINISTRAL_14B):
    return solve(source, target, fixed=fixed or {}, axes=axes, tolerance=tolerance, multiple_of=multiple_of)


@pytest.mark.parametrize("target", [12_000_000_000, 8_500_000_000, 5_000_000_000, 3_400_000_000])
def test_solve_lands_within_tolerance_and_only_shrinks(target):
    shape = _solve(target)
    assert shape is not None
    assert abs(param_count(shape) - target) / target <= 0.02
    for axis in ("layers", "hidden", "ffn"):
        assert getattr(shape, axis) <= getattr(MINISTRAL_14B, axis)
    assert shape.hidden % 256 == 0 and shape.ffn % 256 == 0
    # untouched axes stay as they were
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.vocab, shape.tied_embeddings) == \
        (MINISTRAL_14B.heads, MINISTRAL_14B.kv_heads, MINISTRAL_14B.head_dim, MINISTRAL_14B.vocab, False)


def test_solve_is_deterministic():
    first = _solve(8_000_000_000)
    for _ in range(3):
        assert _solve(8_000_000_000) == first
    # the order of `axes` and of `multiple_of` does not matter
    for axes in itertools.permutations(("layers", "hidden", "ffn")):
        assert _solve(8_000_000_000, axes=axes, multiple_of=dict(reversed(list(MULTIPLES.items())))) == first


def test_solve_respects_fixed_axes():
    shape = _solve(8_000_000_000, fixed={"layers": 30, "tied_embeddings": True})
    assert shape is not None and shape.layers == 30 and shape.tied_embeddings
    assert abs(param_count(shape) - 8e9) / 8e9 <= 0.02


def test_solve_respects_allowed_axes_and_multiples():
    only_ffn = _solve(10_000_000_000, axes=("ffn",))
    assert only_ffn is not None
    assert (only_ffn.layers, only_ffn.hidden) == (MINISTRAL_14B.layers, MINISTRAL_14B.hidden)
    coarse = _solve(10_000_000_000, axes=("ffn",), multiple_of={"ffn": 1024}, tolerance=0.05)
    assert coarse is not None and coarse.ffn % 1024 == 0
    no_ffn = _solve(10_000_000_000, axes=("layers", "hidden"))
    assert no_ffn is not None and no_ffn.ffn == MINISTRAL_14B.ffn


def test_solve_prefers_the_most_uniform_cut():
    """Among shapes within tolerance, the largest per-axis shrink is as small as it can be."""
    shape = _solve(8_000_000_000)

    def worst(s):
        return max(1 - getattr(s, a) / getattr(MINISTRAL_14B, a) for a in ("layers", "hidden", "ffn"))

    for layers in range(20, 41):
        for hidden in range(256, 5121, 256):
            for ffn in range(256, 16385, 256):
                s = MINISTRAL_14B.replace(layers=layers, hidden=hidden, ffn=ffn)
                if abs(param_count(s) - 8e9) / 8e9 <= 0.02:
                    assert worst(s) >= worst(shape) - 1e-9


@pytest.mark.parametrize("kwargs", [
    {"target": 1_000_000_000, "axes": ("ffn",)},  # the FFN alone cannot remove that much
    {"target": 20_000_000_000},  # larger than the source: pruning only shrinks
    {"target": 10_000_000, "axes": ("layers",)},  # embeddings alone are larger than the target
], ids=["ffn-only", "larger-than-source", "below-embeddings"])
def test_solve_returns_none_when_unreachable(kwargs):
    assert _solve(**kwargs) is None
