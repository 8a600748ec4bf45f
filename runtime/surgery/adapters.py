"""Where each supported architecture keeps its decoder tensors, as safetensors key patterns.

Owns only names (checkpoint keys and module paths, checked against transformers 5.24); it never
copies modelling code and never touches tensor values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cascadec.shapes import HF_MODEL_TYPES

# Per-layer tensors every supported family has, keyed by the role pruning gives them.
# Keys are relative to "<prefix>layers.<i>.". All are SwiGLU, RMSNorm, GQA decoders.
LAYER = {
    "input_norm": "input_layernorm.weight",
    "post_norm": "post_attention_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}

# What a family adds to LAYER: Qwen2 biases on q/k/v; Qwen3 per-head RMSNorm on q and k.
EXTRA = {
    "llama": {},
    "mistral": {},
    "ministral3": {},
    "mistral3": {},
    "qwen2": {
        "q_bias": "self_attn.q_proj.bias",
        "k_bias": "self_attn.k_proj.bias",
        "v_bias": "self_attn.v_proj.bias",
    },
    "qwen3": {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"},
}


@dataclass(frozen=True)
class Adapter:
    """Key patterns of one family's checkpoint and the module path of its text decoder."""

    family: str
    prefix: str  # checkpoint key prefix of the text decoder ("model.")
    head: str  # checkpoint key of the LM head (absent from the file when tied)
    module: str  # attribute path of the text decoder in the loaded HF model
    config_key: str | None  # None: shape keys at the top of config.json; else that sub-dict

    def layer_keys(self, i: int) -> dict[str, str]:
        """Role -> checkpoint key for decoder layer ``i``."""
        table = {**LAYER, **EXTRA[self.family]}
        return {role: f"{self.prefix}layers.{i}.{key}" for role, key in table.items()}

    @property
    def embed(self) -> str:
        return f"{self.prefix}embed_tokens.weight"

    @property
    def final_norm(self) -> str:
        return f"{self.prefix}norm.weight"

    def is_text(self, key: str) -> bool:
        """True for tensors of the text decoder (everything else is carried across unchanged)."""
        return key.startswith(self.prefix) or key == self.head

    def decoder(self, model):
        """The loaded model's text decoder module (has ``layers``, ``norm``, ``embed_tokens``)."""
        module = model
        for name in self.module.split("."):
            module = getattr(module, name)
        return module


# Mistral 3's text tower is saved under "language_model.*"; the vision tower and the
# multi-modal projector sit beside it and are carried along (projector re-cut, see prune.py).
MISTRAL3_PROJECTOR = ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2")


def for_family(family: str) -> Adapter:
    if family == "mistral3":
        return Adapter(family, "language_model.model.", "language_model.lm_head.weight",
                       "model.language_model", "text_config")
    return Adapter(family, "model.", "lm_head.weight", "model", None)


def read_config(model_dir: Path) -> dict:
    """``config.json`` of a checkpoint directory, with a readable error when it is missing."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {model_dir} a Hugging Face model directory?")
    return json.loads(path.read_text())


def for_config(config: dict) -> Adapter:
    """The adapter for a ``config.json`` mapping; ValueError for an unsupported model_type."""
    model_type = config.get("model_type")
    runtime_types = {t: f for t, f in HF_MODEL_TYPES.items() if f in EXTRA}  # some families are plan-only
    if model_type not in runtime_types:
        supported = ", ".join(sorted(runtime_types))
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {supported}")
    return for_family(runtime_types[model_type])


def load_model(model_dir: Path, *, dtype=None, device: str = "cpu"):
    """Load a checkpoint with transformers (Mistral 3 as its vision-language class)."""
    import transformers as tf

    config = read_config(model_dir)
    cls = tf.Mistral3ForConditionalGeneration if config.get("model_type") == "mistral3" \
        else tf.AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=dtype or "auto")
    return model.to(device).eval()
