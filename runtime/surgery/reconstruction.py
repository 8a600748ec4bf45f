"""How close a pruned model stays to its source: reference outputs taken at calibration, and the
comparison every prune ends with (load the output with ``from_pretrained``, one forward pass).

Owns the reference tensors (``verify_*`` in ``stats.safetensors``) and the metrics; never writes
a checkpoint. Vocabulary-sized logits exist one chunk of tokens at a time.

Metrics, per token of the verification sequences (the first calibration sequences, at most
``VERIFY_TOKENS`` tokens):

- ``kl``: KL(source ‖ pruned) over the source's top-``TOP_K`` tokens plus one bucket for the rest
  of the vocabulary. Merging outcomes never raises a KL (data-processing inequality), so this is
  a lower bound of the full-vocabulary KL, and equal to it when the source puts no mass outside
  its top-k. It is what a short distillation has to win back.
- ``loss`` / ``source_loss`` / ``loss_delta``: next-token cross-entropy on the calibration text.
- ``top1_agreement``: share of tokens where both models' most likely next token is the same.
"""

from __future__ import annotations

import torch

TOP_K = 64
VERIFY_TOKENS = 8192
CHUNK = 256  # tokens per [chunk x vocab] logits block
REST_EPS = 1e-6
# Above this KL (nats/token) a prune warns: the cut, or an approximation in it, lost a lot.
# (Cutting 20% of a trained model's depth costs ~0.5-1 nat; a broken tied-head rotation cost
# several.) `cascadec prune --compare` shows what each criterion would cost.
WARN_KL = 1.0
REFERENCE_KEYS = ("verify_ids", "verify_topk_ids", "verify_topk_logp", "verify_nll")


def _log_probs(model, ids: torch.Tensor):
    """Yield (sequence index, first token, [chunk, V] float32 log-probs), one sequence and one
    chunk of tokens at a time: the text decoder's final states through the LM head."""
    from .adapters import for_config

    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    decoder = for_config(model.config.to_dict()).decoder(model)
    for i in range(len(ids)):
        hidden = decoder(input_ids=ids[i:i + 1].to(device), use_cache=False).last_hidden_state[0]
        for start in range(0, hidden.shape[0], CHUNK):
            yield i, start, torch.log_softmax(head(hidden[start:start + CHUNK]).float(), dim=-1)


@torch.inference_mode()
def reference(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The source's top-k log-probs and next-token losses on ``ids`` [n, S] (the stats' ``verify_*``)."""
    n, s = ids.shape
    k = min(TOP_K, model.get_output_embeddings().weight.shape[0])
    out = {"verify_ids": ids.clone(), "verify_topk_ids": torch.zeros(n, s, k, dtype=torch.int32),
           "verify_topk_logp": torch.zeros(n, s, k), "verify_nll": torch.zeros(n, s - 1)}
    for i, start, logp in _log_probs(model, ids):
        end = start + len(logp)
        values, index = logp.topk(k, dim=-1)
        out["verify_topk_ids"][i, start:end] = index.to("cpu", torch.int32)
        out["verify_topk_logp"][i, start:end] = values.cpu()
        labels = ids[i, start + 1:end + 1].to(logp.device)
        out["verify_nll"][i, start:start + len(labels)] = -logp[:len(labels)].gather(1, labels[:, None])[:, 0].cpu()
    return out


def verify_ids(ids: torch.Tensor) -> torch.Tensor:
    """The calibration sequences the reference is taken on: the first ones, up to VERIFY_TOKENS."""
    return ids[:max(1, VERIFY_TOKENS // ids.shape[1])]


def _rest(logp: torch.Tensor) -> torch.Tensor:
    """1 - Σ exp(logp) over the last axis: the mass outside the listed tokens. Below REST_EPS it
    is the rounding of float32 log-probs (top-k = vocab), not probability, and counts as 0."""
    rest = 1.0 - logp.exp().sum(-1)
    return torch.where(rest < REST_EPS, torch.zeros_like(rest), rest)


@torch.inference_mode()
def compare(model, ref: dict[str, torch.Tensor]) -> dict:
    """The metrics above for ``model`` against the reference ``ref``."""
    ids = ref["verify_ids"].long()
    kl = nll = agree = 0.0
    for i, start, logq in _log_probs(model, ids):
        end = start + len(logq)
        top = ref["verify_topk_ids"][i, start:end].long().to(logq.device)
        p = ref["verify_topk_logp"][i, start:end].double().to(logq.device)
        q = logq.gather(1, top).double()
        p_rest, q_rest = _rest(p), _rest(q).clamp_min(REST_EPS)
        rest = torch.special.xlogy(p_rest, p_rest) - torch.special.xlogy(p_rest, q_rest)
        kl += float((p.exp() * (p - q)).sum() + rest.sum())
        agree += float((logq.argmax(-1) == top[:, 0]).sum())
        labels = ids[i, start + 1:end + 1].to(logq.device)
        nll += float(-logq[:len(labels)].gather(1, labels[:, None]).sum())
    tokens, predicted = ids.numel(), ids.shape[0] * (ids.shape[1] - 1)
    source_loss = float(ref["verify_nll"].double().sum()) / predicted
    return {"tokens": tokens, "kl": kl / tokens, "loss": nll / predicted, "source_loss": source_loss,
            "loss_delta": nll / predicted - source_loss, "top1_agreement": agree / tokens}


def verify(model_dir, stats: dict, *, warn_kl: float = WARN_KL, log=print) -> dict:
    """Load ``model_dir`` with ``from_pretrained`` and run it: against the calibration reference
    when ``stats`` has one, else on a few token ids (it must load and produce finite logits).

    Raises ValueError when the checkpoint does not load or its outputs are not finite.
    """
    from .adapters import load_model

    cuda = torch.cuda.is_available()
    try:
        model = load_model(model_dir, dtype=None if cuda else torch.float32, device="cuda" if cuda else "cpu")
    except Exception as e:  # transformers' own message says what it refused
        raise ValueError(f"the pruned checkpoint does not load with from_pretrained: {' '.join(str(e).split())}") from None
    if all(key in stats for key in REFERENCE_KEYS):
        metrics = compare(model, {key: stats[key] for key in REFERENCE_KEYS})
    else:
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.arange(16).remainder(vocab)[None]
        metrics = {"tokens": 16}  # no reference: only "it loads and its logits are finite"
        if not all(bool(logp.isfinite().all()) for _, _, logp in _log_probs(model, ids)):
            metrics["logits"] = float("nan")
    if not all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values()):
        raise ValueError(f"the pruned model's outputs are not finite ({metrics})")
    if metrics.get("kl", 0.0) > warn_kl:
        metrics["warning"] = (f"the pruned model is far from its source on the calibration text: "
                              f"KL {metrics['kl']:.3f} nats/token (warning above {warn_kl}), next-token loss "
                              f"{metrics['source_loss']:.3f} -> {metrics['loss']:.3f}")
        log(f"warning: {metrics['warning']}; `cascadec prune --compare` shows what each criterion costs")
    return metrics
