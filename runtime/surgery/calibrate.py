"""Calibration statistics for pruning: forward hooks over calibration batches, one pass.

Owns the scores (layers, FFN channels, residual stream, heads), their files (``stats.safetensors``
and ``summary.json``) and their exact definitions below. It never changes a model.

Scores, all accumulated in float64 across batches; per-batch reductions run in float32 whatever
the model's dtype (a bf16 model's activations are upcast first: bf16 keeps 8 significant bits, so
norm ratios 0.4% apart would tie and the tie would fall to the layer index):

- ``norm_ratio`` [L]: mean over tokens of ‖layer output‖/‖layer input‖ (Ministral 3, Alg. 2).
- ``block_influence`` [L]: 1 − mean over tokens of cos(layer input, layer output) (ShortGPT).
- ``angular_distance`` [L+1, L+1]: mean over sequences of arccos(cos(x_i, x_j))/π at the last
  token, where x_i is the input of layer i and x_L the last layer's output before the final
  norm (Gromov et al.). Block (ℓ, n) reads entry [ℓ, ℓ+n]; every n is available from one pass.
- ``ffn_activation`` [L, F]: mean over tokens of |SiLU(W1·x) ⊙ W3·x| (the down_proj input).
- ``hidden_covariance`` [d, d]: the *uncentered* second moment E[x xᵀ] of the inputs of every
  attention and FFN norm, pooled over all layers (for PCA). Uncentered because the rotation
  must preserve x itself, not x − mean: RMSNorm sees the raw residual, mean included.
- ``hidden_channel`` [d]: Minitron embedding-channel importance as ModelOpt computes it: per
  norm output, mean |x| over the sequence, L2 over the batch, then summed over all norms.
  ``hidden_energy`` [d] beside it is E[x²] per channel of the norm inputs (the diagonal of
  ``hidden_covariance``), which prune.py needs to rescale RMSNorm after channel selection.
- ``heads`` [L, H]: Minitron head importance: L2 over head_dim of the o_proj input per head
  and token, mean over the sequence, L2 over the batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..progress import Progress

SCORES = ("norm_ratio", "block_influence", "angular", "ffn_activation", "hidden_pca",
          "hidden_channel", "heads")


class Accumulator:
    """Running sums that the hooks add to; ``result()`` turns them into the scores."""

    def __init__(self, n_layers: int, scores: set[str]):
        self.n, self.scores = n_layers, scores
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0  # tokens seen per layer
        self.sequences = 0
        self.last: list[torch.Tensor | None] = [None] * (n_layers + 1)  # last-token states
        self.batch_xx: torch.Tensor | None = None  # this batch's second moment, float32

    def add(self, name: str, value: torch.Tensor, index=None) -> None:
        value = value.detach().to("cpu", torch.float64)
        if name not in self.sums:
            shape = value.shape if index is None else (self.n, *value.shape)
            self.sums[name] = torch.zeros(shape, dtype=torch.float64)
        if index is None:
            self.sums[name] += value
        else:
            self.sums[name][index] += value

    def layer(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Decoder layer ``i`` maps residual ``x`` to ``y`` ([B, S, d])."""
        x, y = x.float(), y.float()
        if self.scores & {"norm_ratio", "block_influence"}:
            ratio = y.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
            self.add("norm_ratio", ratio.sum().reshape(1), i)
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            self.add("cos_in_out", cos.sum().reshape(1), i)
        if "angular" in self.scores:
            self.last[i] = x[:, -1]
            if i == self.n - 1:
                self.last[self.n] = y[:, -1]

    def end_batch(self) -> None:
        """Fold this batch's second moment into float64; pairwise angular distances."""
        if self.batch_xx is not None:
            self.add("hidden_xx", self.batch_xx)
            self.batch_xx = None
        if "angular" not in self.scores:
            return
        states = torch.nn.functional.normalize(torch.stack(self.last).double(), dim=-1)  # [L+1, B, d]
        cos = torch.einsum("ibd,jbd->bij", states, states).clamp(-1.0, 1.0)
        self.add("angular_distance", (torch.arccos(cos) / math.pi).sum(0))

    def result(self) -> dict[str, torch.Tensor]:
        s, out = self.sums, {}
        if "norm_ratio" in s:
            out["norm_ratio"] = s["norm_ratio"][:, 0] / self.tokens
            out["block_influence"] = 1.0 - s["cos_in_out"][:, 0] / self.tokens
        if "angular_distance" in s:
            out["angular_distance"] = s["angular_distance"] / self.sequences
        if "ffn_abs" in s:
            out["ffn_activation"] = s["ffn_abs"] / self.tokens
        if "hidden_xx" in s:
            out["hidden_covariance"] = s["hidden_xx"] / (2 * self.n * self.tokens)
        if "hidden_sq" in s:
            out["hidden_channel"] = s["hidden_sq"].sqrt().sum(0)
            out["hidden_energy"] = s["hidden_x2"] / (2 * self.n * self.tokens)
        if "heads_sq" in s:
            out["heads"] = s["heads_sq"].sqrt()
        out["tokens"] = torch.tensor([self.tokens], dtype=torch.float64)
        return out


def _first(t):
    return t[0] if isinstance(t, tuple) else t


def install_hooks(decoder, acc: Accumulator, head_dim: int) -> list:
    """Register the hooks each requested score needs; returns the handles to remove."""
    handles, scores = [], acc.scores

    def on_layer(i):
        return lambda m, args, out: acc.layer(i, args[0], _first(out))

    def on_norm(slot):
        def hook(m, args, out):
            x = args[0]
            if "hidden_pca" in scores:  # float32 within a batch (addmm in place), float64 across
                flat = x.reshape(-1, x.shape[-1]).float()
                if acc.batch_xx is None:
                    acc.batch_xx = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
                acc.batch_xx.addmm_(flat.T, flat)
            if "hidden_channel" in scores:
                acc.add("hidden_sq", out.float().abs().mean(1).pow(2).sum(0), slot)
                acc.add("hidden_x2", x.float().pow(2).sum((0, 1)))
        return hook

    def on_down(i):
        return lambda m, args: acc.add("ffn_abs", args[0].float().abs().sum((0, 1)), i)

    def on_o(i):
        def hook(m, args):
            x = args[0].float()
            per_head = x.view(*x.shape[:-1], -1, head_dim).norm(dim=-1)  # [B, S, H]
            acc.add("heads_sq", per_head.mean(1).pow(2).sum(0), i)
        return hook

    if "hidden_channel" in scores:  # one row per norm: 2 per layer
        acc.sums["hidden_sq"] = torch.zeros(2 * acc.n, decoder.config.hidden_size, dtype=torch.float64)
    for i, layer in enumerate(decoder.layers):
        if scores & {"norm_ratio", "block_influence", "angular"}:
            handles.append(layer.register_forward_hook(on_layer(i)))
        if scores & {"hidden_pca", "hidden_channel"}:
            handles.append(layer.input_layernorm.register_forward_hook(on_norm(2 * i)))
            handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm(2 * i + 1)))
        if "ffn_activation" in scores:
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        if "heads" in scores:
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
    return handles


@torch.inference_mode()
def collect(decoder, input_ids: torch.Tensor, *, batch_size: int, scores, progress: bool = True) -> dict:
    """Run the text decoder (no LM head: no score needs logits) over ``input_ids`` once."""
    unknown = set(scores) - set(SCORES)
    if unknown:
        raise ValueError(f"unknown calibration scores {sorted(unknown)}; known: {', '.join(SCORES)}")
    acc = Accumulator(len(decoder.layers), set(scores))
    head_dim = decoder.layers[0].self_attn.head_dim
    handles = install_hooks(decoder, acc, head_dim)
    device = next(decoder.parameters()).device
    starts = range(0, len(input_ids), batch_size)
    bar = Progress(len(starts), what="calibrate", unit="batch", enabled=progress)
    try:
        for start in starts:
            batch = input_ids[start:start + batch_size].to(device)
            decoder(input_ids=batch, use_cache=False)
            acc.tokens += batch.numel()
            acc.sequences += len(batch)
            acc.end_batch()
            bar.update(1)
        bar.close()
    finally:
        for h in handles:
            h.remove()
    return acc.result()


def summarize(stats: dict, *, angular_block: int | None = None) -> dict:
    """The readable ``summary.json``: per-layer scores, PCA energy, most/least important units."""
    out: dict = {"tokens": int(stats["tokens"][0])}
    for name in ("norm_ratio", "block_influence"):
        if name in stats:
            out[name] = [round(float(v), 6) for v in stats[name]]
    if "angular_distance" in stats and angular_block:
        d, n = stats["angular_distance"], angular_block
        out["angular"] = {"block": n, "distance_by_start": [round(float(d[i, i + n]), 6)
                                                             for i in range(len(d) - n)]}
    if "hidden_covariance" in stats:
        eig = torch.linalg.eigvalsh(stats["hidden_covariance"]).flip(0).clamp_min(0)
        energy = eig.cumsum(0) / eig.sum()
        d = len(eig)
        out["hidden_pca_energy"] = {str(k): round(float(energy[k - 1]), 6)
                                    for k in sorted({max(1, d // 4), d // 2, 3 * d // 4, d})}
    if "ffn_activation" in stats:
        out["ffn_activation_mean"] = [round(float(v), 6) for v in stats["ffn_activation"].mean(1)]
    if "heads" in stats:
        out["heads"] = [[round(float(v), 6) for v in row] for row in stats["heads"]]
    return out


def _described(source: dict | None):
    """The calibration source as summary.json records it (the executor hands paths over as Paths)."""
    if source is None:
        return "builtin:stdlib"
    return {k: [str(p) for p in v] if k == "paths" else v for k, v in source.items()}


def save(stats: dict, summary: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in stats.items()}, out_dir / "stats.safetensors")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


def load(stats_dir: Path) -> dict[str, torch.Tensor]:
    path = Path(stats_dir)
    path = path / "stats.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the calibrate stage first")
    return load_file(path)


def calibrate(model_dir: Path, *, source: dict | None, samples: int, seq_len: int, batch_size: int = 4,
              offset: int = 0, scores=SCORES, angular_block: int | None = None,
              progress: bool = True) -> tuple[dict, dict]:
    """Load ``model_dir``, pack its calibration tokens, collect the scores: (stats, summary).

    ``stats`` also holds the model's reference outputs on the first sequences (reconstruction.py),
    against which every prune of this model is checked.

    Runs on the GPU in the checkpoint's dtype when there is one, else on CPU in float32 (CPU
    half-precision matmuls are slow and the scores are float64 sums anyway).
    """
    from transformers import AutoTokenizer

    from ..data.readers import Skips
    from .adapters import for_config, load_model, read_config
    from .calibration_text import pack
    from .reconstruction import reference, verify_ids

    adapter = for_config(read_config(model_dir))
    skips = Skips()
    ids = pack(AutoTokenizer.from_pretrained(model_dir), source, samples=samples, seq_len=seq_len, offset=offset,
               skips=skips)
    cuda = torch.cuda.is_available()
    model = load_model(model_dir, dtype=None if cuda else torch.float32, device="cuda" if cuda else "cpu")
    if scores:
        stats = collect(adapter.decoder(model), ids, batch_size=batch_size, scores=scores, progress=progress)
    else:  # nothing to choose (a tie, or a keep-everything cut): only the reference below
        stats = {"tokens": torch.tensor([0.0], dtype=torch.float64)}
    stats.update(reference(model, verify_ids(ids)))  # what the pruned model is compared against
    summary = {"samples": samples, "seq_len": seq_len, "offset": offset,
               "data": _described(source), **summarize(stats, angular_block=angular_block)}
    if skips.total:  # records skipped under `on_error: skip` are reported, never dropped silently
        summary["data_skipped"] = skips.manifest()
    return stats, summary
