"""Tiny random Hugging Face decoders and a tokenizer, built from configs (no downloads).

Every runtime test starts here, so the families, shapes and seeds are the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n"
    "    def push(self, x):\n        self.items.append(x)\n"
    "for i in range(10):\n    print(i * i, 'squared')\n"
    "The quick brown fox jumps over the lazy dog. 12 + 30 = 42.\n"
) * 4

TINY = dict(layers=4, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, vocab=320)


def tokenizer(vocab: int = TINY["vocab"]):
    from cascadec.runtime.tokenizer import train_bpe

    return train_bpe([TEXT], vocab)


def hf_config(family: str = "mistral", *, tied: bool = False, **overrides):
    """A transformers config of ``family`` at the tiny shape (overrides by cascadec axis name)."""
    import transformers as tf

    s = {**TINY, **overrides}
    text_kw = dict(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], tie_word_embeddings=tied,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family == "mistral3":
        text = tf.MistralConfig(**text_kw)
        vision = tf.PixtralVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            head_dim=16, image_size=32, patch_size=8,
        )
        return tf.Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=tied)
    classes = {
        "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "ministral3": tf.Ministral3Config,
        "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
    }
    return classes[family](**text_kw)


def save_model(path: Path, family: str = "mistral", *, seed: int = 0, tied: bool = False, **overrides) -> Path:
    """Build a random model of ``family``, save it (safetensors + tokenizer) to ``path``."""
    import torch
    import transformers as tf

    config = hf_config(family, tied=tied, **overrides)
    torch.manual_seed(seed)
    if family == "mistral3":
        model = tf.Mistral3ForConditionalGeneration(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    model.eval()
    model.save_pretrained(path)
    tokenizer(config.get_text_config().vocab_size).save_pretrained(path)
    return Path(path)
