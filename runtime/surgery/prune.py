"""Structured pruning of a Hugging Face checkpoint, streamed one decoder layer at a time.

Owns the tensor rewrite: reads the source with ``safe_open`` per layer, applies what keep.py
chose (layers, FFN channels, heads, the hidden basis), writes shards, config and report. It
never loads the model class, so cutting a checkpoint never holds it twice in memory: peak is
about one layer in and out plus the rotation (embedding and head go in row blocks; shards stream).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from cascadec.shapes import Shape, from_hf_config, hf_config_updates, param_count

from . import keep as keeping
from .adapters import MISTRAL3_PROJECTOR, Adapter, for_config, read_config
from ..progress import Progress
from ..checkpoint import DEFAULT_SHARD_BYTES, Reader, ShardWriter, atomic_dir, copy_side_files
from .keep import Basis, Keep, SurgeryError
from .reconstruction import WARN_KL, verify


def rows(w: torch.Tensor, index: torch.Tensor | None, dim: int = 0, block: int = 1) -> torch.Tensor:
    """Keep ``index`` (in units of ``block`` rows, e.g. heads of head_dim) along ``dim``."""
    if index is None:
        return w
    flat = (index[:, None] * block + torch.arange(block)).flatten()
    return w.index_select(dim, flat)


def cut_layer(t: dict[str, torch.Tensor], k: Keep, i: int, head_dim: int) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors (by role, float32) in the pruned model's layout.

    Readers of the stream (q/k/v, gate/up) fold their norm's gain and rotate their inputs;
    writers (o, down) rotate their outputs; q/k norms act per head_dim and are unchanged.
    """
    b, heads, kv, ffn = k.basis, k.heads.get(i), k.kv_heads.get(i), k.ffn.get(i)
    g1, g2 = t["input_norm"], t["post_norm"]
    out = {"input_norm": b.norm(g1), "post_norm": b.norm(g2),
           "o": b.write(rows(t["o"], heads, 1, head_dim)),
           "gate": b.read(rows(t["gate"], ffn), g2), "up": b.read(rows(t["up"], ffn), g2),
           "down": b.write(rows(t["down"], ffn, 1))}
    for role, index in (("q", heads), ("k", kv), ("v", kv)):
        out[role] = b.read(rows(t[role], index, 0, head_dim), g1)
        if f"{role}_bias" in t:
            out[f"{role}_bias"] = rows(t[f"{role}_bias"], index, 0, head_dim)
    for role in ("q_norm", "k_norm"):
        if role in t:
            out[role] = t[role]
    return out


def cut_projector(t: dict[str, torch.Tensor], b: Basis, hidden: int) -> dict[str, torch.Tensor]:
    """Mistral 3's vision->text projector: its output (linear_2 rows) enters the residual stream,
    so it takes the new basis; its inner width is tied to the text hidden size by the config,
    so it keeps the ``hidden`` inner units with the largest ‖W1 row‖·‖W2 column‖ (Ministral 3
    retrains this projector per size anyway)."""
    if b.rotation is None and b.index is None:
        return t
    l1, l2 = MISTRAL3_PROJECTOR
    w1, w2 = t[f"{l1}.weight"], t[f"{l2}.weight"]
    inner = keeping.top(w1.norm(dim=1) * w2.norm(dim=0), hidden)
    out = {f"{l1}.weight": w1[inner], f"{l2}.weight": b.write(w2[:, inner])}
    if f"{l1}.bias" in t:
        out[f"{l1}.bias"] = t[f"{l1}.bias"][inner]
        out[f"{l2}.bias"] = b.write(t[f"{l2}.bias"])
    return out


def check_keys(reader: Reader, adapter: Adapter, source: Shape) -> None:
    """Every text-decoder tensor must be one the adapter knows; anything else is refused."""
    known = {adapter.embed, adapter.final_norm, adapter.head}
    for i in range(source.layers):
        known |= set(adapter.layer_keys(i).values())
    unknown = [k for k in reader.keys() if adapter.is_text(k) and k not in known]
    if unknown:
        raise SurgeryError(f"unsupported tensor {unknown[0]!r} in the {source.family} checkpoint",
                           "only SwiGLU/RMSNorm/GQA decoders of the supported families can be pruned")


def write_text(reader: Reader, adapter: Adapter, source: Shape, target: Shape, k: Keep, out: ShardWriter) -> int:
    """Embeddings, layers (renumbered), final norm and head; returns their parameter count."""
    written = 0

    def put(key, tensor, dtype):
        nonlocal written
        written += tensor.numel()
        out.add(key, tensor.to(dtype))

    def put_rows(key, transform):  # vocabulary-sized matrices go through in row blocks
        nonlocal written
        written += target.vocab * target.hidden
        chunks = (transform(c.float()).to(dtype) for c in reader.row_chunks(key))
        out.add_rows(key, [target.vocab, target.hidden], dtype, chunks)

    dtype = reader.read([adapter.final_norm])[adapter.final_norm].dtype
    put_rows(adapter.embed, k.basis.read)
    bar = Progress(len(k.layers), what="prune", unit="layer")
    for new_i, old_i in enumerate(k.layers):
        keys = adapter.layer_keys(old_i)
        found = reader.read(keys.values())
        t = {role: found.pop(key).float() for role, key in keys.items() if key in found}
        new_keys = adapter.layer_keys(new_i)
        for role, tensor in cut_layer(t, k, old_i, source.head_dim).items():
            put(new_keys[role], tensor, dtype)
        bar.update(1)
    bar.close()
    g = reader.read([adapter.final_norm])[adapter.final_norm].float()
    if target.tied_embeddings:  # the head is the embedding: it cannot absorb the final gain
        put(adapter.final_norm, k.basis.tied_final_norm(g), dtype)
    else:
        put(adapter.final_norm, k.basis.norm(g), dtype)
        put_rows(adapter.head, lambda rows: k.basis.read(rows, g))
    return written


def write_rest(reader: Reader, adapter: Adapter, target: Shape, k: Keep, out: ShardWriter) -> None:
    """Tensors outside the text decoder (Mistral 3's vision tower) are copied, one at a time."""
    projector = [f"{p}.{s}" for p in MISTRAL3_PROJECTOR for s in ("weight", "bias")]
    rest = [key for key in reader.keys() if not adapter.is_text(key) and key not in projector]
    for key in rest:
        out.add(key, reader.read([key])[key])
    t = reader.read(projector)
    if t:
        dtype = next(iter(t.values())).dtype
        for key, tensor in cut_projector({n: v.float() for n, v in t.items()}, k.basis, target.hidden).items():
            out.add(key, tensor.to(dtype))


def new_config(config: dict, adapter: Adapter, target: Shape, layers: list[int]) -> dict:
    config = copy.deepcopy(config)
    text = config[adapter.config_key] if adapter.config_key else config
    text.update(hf_config_updates(target))
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = [text["layer_types"][i] for i in layers]
    config["tie_word_embeddings"] = target.tied_embeddings
    return config


def prune(src: Path, out: Path, *, stats: dict, target: Shape, methods: dict,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, calibration: dict | None = None,
          warn_kl: float = WARN_KL, log=print) -> dict:
    """Write the pruned checkpoint of ``src`` at ``target`` shape to ``out``; returns the report.

    ``methods`` maps axis (layers, hidden, ffn, heads) to a method name or None (unchanged).
    ``calibration`` (the calibration summary) is copied into ``prune_report.json``. The output
    is loaded back with ``from_pretrained`` and compared with the source on the calibration
    reference in ``stats`` (``report["reconstruction"]``; a warning above ``warn_kl``).
    Raises SurgeryError for an unreachable target; writes nothing to ``out`` on any error.
    """
    config = read_config(src)
    adapter, source = for_config(config), from_hf_config(config)
    keeping.check(source, target, methods, stats)
    reader = Reader(src)
    check_keys(reader, adapter, source)
    final_gain = reader.read([adapter.final_norm])[adapter.final_norm].float()
    k = keeping.decide(source, target, methods, stats, final_gain)
    log(f"prune: {source.layers}->{target.layers} layers, hidden {source.hidden}->{target.hidden}, "
        f"ffn {source.ffn}->{target.ffn}, heads {source.heads}/{source.kv_heads}->{target.heads}/{target.kv_heads}")
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        written = write_text(reader, adapter, source, target, k, writer)
        write_rest(reader, adapter, target, k, writer)
        writer.close()
        if written != param_count(target):  # the plan's figure and the file must agree exactly
            raise RuntimeError(f"wrote {written} text parameters, expected {param_count(target)}")
        (tmp / "config.json").write_text(json.dumps(new_config(config, adapter, target, k.layers), indent=2) + "\n")
        copied = copy_side_files(src, tmp)
        try:  # the output must load and run; against the calibration reference when there is one
            reconstruction = verify(tmp, stats, warn_kl=warn_kl, log=log)
        except ValueError as e:
            raise SurgeryError(str(e), "this is a bug in cascadec's surgery for this model; please report it "
                               "with the model's config.json") from None
        report = {"source": source.axes(), "target": target.axes(), "params": written,
                  "source_params": param_count(source), "methods": methods, "kept": k.report,
                  "copied": copied, "shards": len(writer.shards), "calibration": calibration,
                  "reconstruction": reconstruction}
        (tmp / "prune_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def plan_target(config: dict, source: Shape) -> tuple[Shape, dict]:
    """(target shape, methods) of a plan's prune-stage ``config`` for a checkpoint of ``source``.

    The plan's ``source_shape`` must describe the checkpoint actually given; a mismatch means
    the plan is stale or points at the wrong model.
    """
    planned = config.get("source_shape")
    if planned and {k: v for k, v in source.axes().items() if k in planned} != dict(planned):
        raise SurgeryError(f"the checkpoint's shape {source.axes()} is not the plan's source_shape {dict(planned)}",
                           "re-plan, or point the stage at the model the plan was made for")
    target = source.replace(**config["target"])
    if config.get("tie_embeddings"):
        target = target.replace(tied_embeddings=True)
    methods = {axis: (config.get("methods") or {}).get(axis) for axis in keeping.METHODS}
    return target, methods
