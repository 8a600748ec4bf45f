"""Architecture presets: the published shapes of well-known parents, by name (`arch: {preset: qwen3-8b}`).

A plain dict literal, read at import time without any I/O, so `cascadec plan` stays fast. Each
entry is copied from the checkpoint's `config.json` (the `config` URL; for the vision-language
Mistral 3 checkpoints, its `text_config`). `tests/test_presets.py` checks every entry against
the parameter count its publisher gives, from a table of its own.
"""

from __future__ import annotations


def _hf(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


def _qwen3(repo, layers, hidden, ffn, heads, tied):
    return {"hub": repo, "config": _hf(repo),
            "arch": {"family": "qwen3", "layers": layers, "hidden": hidden, "ffn": ffn, "heads": heads, "kv_heads": 8,
                     "head_dim": 128, "vocab": 151936, "tied_embeddings": tied, "max_position_embeddings": 40960}}


def _llama(repo, layers, hidden, ffn, heads, head_dim, tied):
    return {"hub": repo, "config": _hf(repo),
            "arch": {"family": "llama", "layers": layers, "hidden": hidden, "ffn": ffn, "heads": heads, "kv_heads": 8,
                     "head_dim": head_dim, "vocab": 128256, "tied_embeddings": tied,
                     "max_position_embeddings": 131072}}


def _mistral3(repo, layers, hidden, ffn, tied, context):
    return {"hub": repo, "config": _hf(repo),
            "arch": {"family": "mistral3", "layers": layers, "hidden": hidden, "ffn": ffn, "heads": 32, "kv_heads": 8,
                     "head_dim": 128, "vocab": 131072, "tied_embeddings": tied, "max_position_embeddings": context}}


# name -> {"hub": the checkpoint, "config": where the shape was read, "arch": the spec's arch keys}
PRESETS = {
    "mistral-small-3.1-24b": _mistral3("mistralai/Mistral-Small-3.1-24B-Base-2503", 40, 5120, 32768, False, 131072),
    "ministral-3-14b": _mistral3("mistralai/Ministral-3-14B-Base-2512", 40, 5120, 16384, False, 262144),
    "ministral-3-8b": _mistral3("mistralai/Ministral-3-8B-Base-2512", 34, 4096, 14336, False, 262144),
    "ministral-3-3b": _mistral3("mistralai/Ministral-3-3B-Base-2512", 26, 3072, 9216, True, 262144),
    "qwen3-0.6b": _qwen3("Qwen/Qwen3-0.6B", 28, 1024, 3072, 16, True),
    "qwen3-1.7b": _qwen3("Qwen/Qwen3-1.7B", 28, 2048, 6144, 16, True),
    "qwen3-4b": _qwen3("Qwen/Qwen3-4B", 36, 2560, 9728, 32, True),
    "qwen3-8b": _qwen3("Qwen/Qwen3-8B", 36, 4096, 12288, 32, False),
    "qwen3-14b": _qwen3("Qwen/Qwen3-14B", 40, 5120, 17408, 40, False),
    "qwen3-32b": _qwen3("Qwen/Qwen3-32B", 64, 5120, 25600, 64, False),
    "llama-3.1-8b": _llama("meta-llama/Llama-3.1-8B", 32, 4096, 14336, 32, 128, False),
    "llama-3.1-70b": _llama("meta-llama/Llama-3.1-70B", 80, 8192, 28672, 64, 128, False),
    "llama-3.2-1b": _llama("meta-llama/Llama-3.2-1B", 16, 2048, 8192, 32, 64, True),
    "llama-3.2-3b": _llama("meta-llama/Llama-3.2-3B", 28, 3072, 8192, 24, 128, True),
    # Nemotron-4 15B has no Hugging Face config; its shape is Table 1 of arXiv:2402.16819.
    "nemotron-4-15b": {"hub": "nvidia/nemotron-4-15b", "config": "https://arxiv.org/abs/2402.16819 (Table 1)",
                       "arch": {"family": "nemotron", "layers": 32, "hidden": 6144, "ffn": 24576, "heads": 48,
                                "kv_heads": 8, "head_dim": 128, "vocab": 256000, "tied_embeddings": False,
                                "max_position_embeddings": 4096}},
}


def expand(arch: dict) -> dict:
    """A spec's `arch` mapping with its preset (if any) filled in; keys written beside `preset` win."""
    if "preset" not in arch:
        return dict(arch)
    return {**PRESETS[arch["preset"]]["arch"], **{k: v for k, v in arch.items() if k != "preset"}}
