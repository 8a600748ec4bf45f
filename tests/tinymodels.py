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
    from cascadec.runtime.data.tokenizer import train_bpe

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


def stdlib_text(split: str, chars: int) -> str:
    """The first ``chars`` characters of the interpreter's stdlib sources (the runtime's split)."""
    from cascadec.runtime.data.readers import documents, source_files

    out, n = [], 0
    source = {"kind": "builtin", "builtin": "stdlib", "split": split}
    for _, path in source_files(source):
        text = next(documents(path, source))
        out.append(text)
        n += len(text)
        if n >= chars:
            break
    return "\n".join(out)[:chars]


def trained_model(path: Path, family: str = "llama", *, tied: bool = True, steps: int = 300, batch: int = 8,
                  seq_len: int = 64, lr: float = 3e-3, train_chars: int = 400_000, seed: int = 0,
                  **overrides) -> Path:
    """A small model trained on stdlib text, saved like a real checkpoint (safetensors + tokenizer).

    Norm gains start spread around 1 with some negative (1 + 0.8·N(0, 1)), as in trained LLMs
    (a 135M Llama's final norm runs from -2.1 to 3.3), and training moves them on; random
    initialisation would leave unit gains, which hide the bugs that real checkpoints hit.
    """
    import torch
    import transformers as tf

    from cascadec.runtime.data.tokenizer import train_bpe

    text = stdlib_text("train", train_chars)
    config = hf_config(family, tied=tied, **overrides)
    tok = train_bpe([text], config.vocab_size)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.8 * torch.randn(p.shape))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
