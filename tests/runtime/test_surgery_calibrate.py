"""Calibration scores equal a straightforward recomputation from captured activations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import surgery_util as su
from cascadec.runtime.surgery import adapters
from cascadec.runtime.surgery.calibrate import SCORES, collect, summarize


@torch.no_grad()
def reference(decoder, tokens: torch.Tensor) -> dict:
    """Every score by its textbook formula over one big batch, in float64."""
    captured: dict[str, list] = {"post_norm": [], "norm_in": [], "norm_out": [], "o_in": []}
    hooks = []

    def on_norm(module, args, out):  # returns None: a hook's return value would replace the output
        captured["norm_in"].append(args[0].double())
        captured["norm_out"].append(out.double())

    for layer in decoder.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(norm.register_forward_hook(on_norm))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, a, o: captured["post_norm"].append(o)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured["o_in"].append(a[0].double())))
    final_norm, decoder.norm = decoder.norm, torch.nn.Identity()  # last hidden state before the final norm
    try:
        states = [h.double() for h in decoder(input_ids=tokens, output_hidden_states=True).hidden_states]
    finally:
        decoder.norm = final_norm
        for h in hooks:
            h.remove()
    n = len(decoder.layers)
    ref = {
        "norm_ratio": torch.stack([(states[i + 1].norm(dim=-1) / states[i].norm(dim=-1)).mean() for i in range(n)]),
        "block_influence": torch.stack([1 - F.cosine_similarity(states[i], states[i + 1], dim=-1).mean()
                                        for i in range(n)]),
    }
    last = [F.normalize(s[:, -1], dim=-1) for s in states]
    ref["angular_distance"] = torch.tensor([[float((torch.arccos((a * b).sum(-1).clamp(-1, 1)) / math.pi).mean())
                                             for b in last] for a in last], dtype=torch.float64)
    ffn = []
    for layer, m in zip(decoder.layers, captured["post_norm"]):
        act = F.silu(layer.mlp.gate_proj(m)) * layer.mlp.up_proj(m)
        ffn.append(act.double().abs().mean((0, 1)))
    ref["ffn_activation"] = torch.stack(ffn)
    rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured["norm_in"]])
    ref["hidden_covariance"] = rows.T @ rows / len(rows)
    ref["hidden_energy"] = rows.pow(2).mean(0)
    ref["hidden_channel"] = sum(o.abs().mean(1).norm(dim=0) for o in captured["norm_out"])
    head_dim = decoder.layers[0].self_attn.head_dim
    ref["heads"] = torch.stack([x.view(*x.shape[:2], -1, head_dim).norm(dim=-1).mean(1).norm(dim=0)
                                for x in captured["o_in"]])
    return ref


@pytest.mark.parametrize("family", ["qwen3", "mistral3"])
def test_scores_match_reference(tmp_path, family):
    src = su.model(tmp_path, family)
    decoder = adapters.for_family(su.shape(src).family).decoder(adapters.load_model(src, dtype=torch.float32))
    tokens = su.ids(6, 20)
    got = collect(decoder, tokens, batch_size=4, scores=SCORES, progress=False)  # batches of 4 and 2
    want = reference(decoder, tokens)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert int(got["tokens"]) == tokens.numel()


def test_summary_is_readable(tmp_path):
    src = su.model(tmp_path, "mistral")
    stats = su.stats(src)
    summary = summarize(stats, angular_block=2)
    assert len(summary["norm_ratio"]) == 4
    assert len(summary["angular"]["distance_by_start"]) == 3
    assert summary["hidden_pca_energy"]["64"] == pytest.approx(1.0)


# -- precision: scores summed in float32/float64 whatever the model's dtype ------------------------

# Layer norm ratios closer than bf16's resolution near 1 (2^-7 apart; 2^-8 rounding): summed in
# bf16 they become [1.0234, 1.0234, 1.0313, 1.0313, 1.0391]. Permuted so that a bf16 tie between
# layers 0 and 4 would fall to layer 0, while the true second-highest is layer 4.
RATIOS = (1.0285, 1.0199, 1.0386, 1.0240, 1.0334)


@torch.no_grad()
def _tune_ratios(model, ids: torch.Tensor, targets) -> None:
    """Scale each layer's residual branches (o_proj, down_proj) until its fp32 norm ratio hits its
    target: layer i's ratio depends on the scales of layers 0..i only, so one bisection each."""
    decoder = model.model
    originals = [(layer.self_attn.o_proj.weight.clone(), layer.mlp.down_proj.weight.clone()) for layer in decoder.layers]
    for i, (layer, target) in enumerate(zip(decoder.layers, targets)):
        def ratio(scale):
            layer.self_attn.o_proj.weight.copy_(originals[i][0] * scale)
            layer.mlp.down_proj.weight.copy_(originals[i][1] * scale)
            return float(collect(decoder, ids, batch_size=len(ids), scores=["norm_ratio"], progress=False)["norm_ratio"][i])
        hi = 1.0
        while ratio(hi) < target:
            hi *= 2
        lo = 0.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ratio(mid) < target else (lo, mid)
        ratio(hi)


def test_bf16_model_scores_sum_in_float(tmp_path):
    """A bf16 model's norm ratios equal its fp32 upcast's to well below bf16 resolution, so both
    keep the same layers (summed in bf16, layers 0 and 4 would tie and layer 0 would win)."""
    import transformers as tf

    from cascadec.runtime.surgery.keep import choose_layers

    path = su.model(tmp_path, "mistral", layers=len(RATIOS))
    ids = su.ids(n=4, length=32)
    model = adapters.load_model(path, dtype=torch.float32)
    _tune_ratios(model, ids, RATIOS)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # bf16 weights, as released
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=dtype).eval()
        assert loaded.model.layers[0].mlp.down_proj.weight.dtype == dtype
        runs[dtype] = collect(loaded.model, ids, batch_size=2, scores=["norm_ratio"], progress=False)
    fp32, bf16 = runs[torch.float32]["norm_ratio"], runs[torch.bfloat16]["norm_ratio"]
    assert fp32.dtype == bf16.dtype == torch.float64
    assert torch.allclose(fp32, torch.tensor(RATIOS, dtype=torch.float64), atol=2e-4)  # bf16 weights moved them a little
    assert (bf16 - fp32).abs().max() < 5e-4  # a tenth of the gaps between layers
    assert choose_layers("norm_ratio", runs[torch.float32], 5, 2)[0] == [2, 4]
    assert choose_layers("norm_ratio", runs[torch.bfloat16], 5, 2)[0] == [2, 4]
