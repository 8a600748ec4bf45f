"""Loading Hugging Face causal LMs for training stages, with the stage's RoPE settings applied.

Owns only the config edits a training stage makes before weights are loaded (long-context
phases); checkpoint key layouts belong to `adapters.py`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import transformers as tf


def load_config(path: Path, rope: dict | None = None):
    """The model's config with ``rope`` applied (None leaves it unchanged)."""
    config = tf.AutoConfig.from_pretrained(path)
    if rope:
        apply_rope(config, rope)
    return config


def apply_rope(config, rope: dict) -> None:
    """Write the plan's ``config.rope`` into the (text) config.

    ``rope`` is ``{"rope_parameters": {...}, "max_position_embeddings": N}``; a flat mapping of
    rope parameters plus ``max_position_embeddings`` is accepted too. Parameters not named keep
    their current values (``rope_theta`` in particular), so a YaRN phase only states what changes.
    """
    text = config.get_text_config()
    params = rope.get("rope_parameters") or {k: v for k, v in rope.items() if k != "max_position_embeddings"}
    text.rope_parameters = {**(getattr(text, "rope_parameters", None) or {}), **params}
    if rope.get("max_position_embeddings"):
        text.max_position_embeddings = int(rope["max_position_embeddings"])


def model_class(config):
    """Mistral 3 is a vision-language class; every other family is an AutoModelForCausalLM."""
    return tf.Mistral3ForConditionalGeneration if config.model_type == "mistral3" else tf.AutoModelForCausalLM


def load_model(path: Path, *, rope: dict | None = None, dtype=None, empty: bool = False):
    """Load a checkpoint for training (fp32 master weights unless ``dtype`` says otherwise).

    ``empty``: build the model on the meta device without reading any weight (ranks other than 0
    of an fsdp stage, which receive rank 0's weights shard by shard: `fsdp.shard`).
    """
    import torch

    config = load_config(path, rope)
    if empty:
        return _build(config, dtype or torch.float32, "meta")
    return model_class(config).from_pretrained(path, config=config, dtype=dtype or torch.float32)


def init_model(config, *, seed: int, rope: dict | None = None, empty: bool = False):
    """A randomly initialised model of ``config`` (with ``rope`` applied), reproducible from ``seed``
    (``empty``: on the meta device, as in `load_model`)."""
    from accelerate.utils import set_seed

    if rope:
        apply_rope(config, rope)
    set_seed(seed)
    return _build(config, None, "meta" if empty else None)


def _build(config, dtype, device):
    import torch

    cls = model_class(config)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with torch.device(device) if device else contextlib.nullcontext():
        return cls._from_config(config, **kwargs) if cls is tf.Mistral3ForConditionalGeneration else \
            cls.from_config(config, **kwargs)
