"""Choosing by score: dead units go first, and the informed hidden cuts beat random ones."""

from __future__ import annotations

import pytest
import torch

import surgery_util as su
from cascadec.runtime.surgery import keep
from cascadec.runtime.surgery.prune import prune

DEAD = [5, 17, 40, 99]


def kill_ffn_channels(t):
    for i in range(4):
        t[f"model.layers.{i}.mlp.gate_proj.weight"][DEAD] = 0


def kill_kv_group(t):
    """KV head 1's values are zero, so query heads 2 and 3 output nothing."""
    for i in range(4):
        t[f"model.layers.{i}.self_attn.v_proj.weight"][16:32] = 0


def test_zeroed_ffn_channels_go_first(tmp_path):
    src = su.edit(su.model(tmp_path, "mistral"), kill_ffn_channels)
    target = su.shape(src).replace(ffn=128 - len(DEAD))
    report = prune(src, tmp_path / "out", stats=su.stats(src), target=target, methods={"ffn": "activation"},
                   log=lambda m: None)
    for i in range(4):
        assert report["kept"]["ffn"]["kept"][str(i)] == [c for c in range(128) if c not in DEAD]
    tokens = su.ids()
    assert (su.logits(tmp_path / "out", tokens) - su.logits(src, tokens)).abs().max() < 1e-5


def test_dead_kv_group_goes_first(tmp_path):
    src = su.edit(su.model(tmp_path, "mistral"), kill_kv_group)
    target = su.shape(src).replace(heads=2, kv_heads=1)
    report = prune(src, tmp_path / "out", stats=su.stats(src), target=target, methods={"heads": "importance"},
                   log=lambda m: None)
    for i in range(4):
        assert report["kept"]["heads"]["kv_kept"][str(i)] == [0]
        assert report["kept"]["heads"]["kept"][str(i)] == [0, 1]
    tokens = su.ids()
    assert (su.logits(tmp_path / "out", tokens) - su.logits(src, tokens)).abs().max() < 1e-5


def uneven_channels(t):
    """Residual channels of very different scales, as in trained LLMs (a few dominate)."""
    scale = torch.exp(2 * torch.randn(64, generator=torch.Generator().manual_seed(3)))
    t["model.embed_tokens.weight"].mul_(scale)
    for key in [k for k in t if k.endswith(("o_proj.weight", "down_proj.weight"))]:
        t[key].mul_(scale[:, None])


def random_basis(stats: dict, d: int, k: int, seed: int) -> keep.Basis:
    """A random k-dimensional orthonormal basis, with the same RMS compensation rule as PCA."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    cov = stats["hidden_covariance"]
    kept = float(torch.trace(q[:, :k].T @ cov @ q[:, :k]) / torch.trace(cov))
    return keep.Basis(rotation=q[:, :k].float(), gain=(kept * d / k) ** 0.5)


@pytest.mark.slow
def test_informed_hidden_cuts_beat_random(tmp_path, monkeypatch):
    """Next-token loss on the calibration text right after cutting hidden 64 -> 32:
    PCA < random rotations, channel selection < random channels (mean of three draws)."""
    src = su.edit(su.model(tmp_path, "mistral"), uneven_channels)
    stats = su.stats(src, samples=8)
    source = su.text_source(tmp_path)
    from transformers import AutoTokenizer

    from cascadec.runtime.surgery.calibration_text import pack

    tokens = pack(AutoTokenizer.from_pretrained(src), source, samples=8, seq_len=32)
    target = su.shape(src).replace(hidden=32)

    def cut(name, methods, stats=stats):
        prune(src, tmp_path / name, stats=stats, target=target, methods=methods, log=lambda m: None)
        return su.loss(tmp_path / name, tokens)

    pca = cut("pca", {"hidden": "pca"})
    channel = cut("channel", {"hidden": "channel"})
    random_rot, random_chan = [], []
    for seed in range(3):
        basis = random_basis(stats, 64, 32, seed)
        with monkeypatch.context() as m:
            m.setattr(keep, "choose_basis", lambda *a, basis=basis: (basis, {}))
            random_rot.append(cut(f"rot{seed}", {"hidden": "pca"}))
        shuffled = {**stats, "hidden_channel": torch.rand(64, generator=torch.Generator().manual_seed(seed))}
        random_chan.append(cut(f"chan{seed}", {"hidden": "channel"}, shuffled))
    assert pca < sum(random_rot) / 3
    assert channel < sum(random_chan) / 3
