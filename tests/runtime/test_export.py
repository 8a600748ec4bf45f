"""The export stage: complete Hugging Face folders with a model card the hub can show."""

from __future__ import annotations

import json

import transformers as tf
from stagekit import context
from tinymodels import save_model

from cascadec.runtime.stages import export

CARD = {"family": "tiny", "description": "A test family.", "child": "tiny-a", "params": 754816, "root": "parent",
        "root_source": {"hub": "org/parent"},
        "steps": [{"stage": "prune/tiny-a", "what": "pruned from parent to 754,816 parameters (ffn: activation)"},
                  {"stage": "distill/tiny-a/short", "what": "distill at 128 tokens of context, 358,400 tokens of "
                                                            "stdlib-stream, teacher parent"}]}


def test_export_copies_each_checkpoint_and_writes_its_model_card(tmp_path):
    model = save_model(tmp_path / "m", "mistral", seed=0, tied=True)
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"checkpoints": {
        "tiny-a/pruned": {"loss": 3.5, "harness": {"cascadec_perplexity_x": {"bits_per_byte": 1.25}}},
        "tiny-a/short": {"loss": 2.25, "harness": {"cascadec_perplexity_x": {"bits_per_byte": 0.875}}}}}))
    stage = {"id": "export/tiny-a", "kind": "export", "hash": "t",
             "inputs": [{"role": "checkpoint:tiny-a/short"}, {"role": "eval"}],
             "config": {"names": ["short"], "checkpoints": ["tiny-a/short"], "card": CARD}}
    ctx = context(tmp_path / "run", stage, {"checkpoint:tiny-a/short": model, "eval": ev}, {})
    export.run(ctx)
    out = ctx.out / "short"
    assert tf.AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings is True
    assert (out / "README.md").read_text() == "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- cascadec", "- pruning",
        "- distillation", "- tiny", "---", "",
        "# tiny / tiny-a/short", "", "A test family.", "",
        "A 754,816-parameter member of the **tiny** family, made by cascade distillation with cascadec from "
        "**parent** (org/parent): pruned, then distilled with a larger model as teacher.", "",
        "## How it was made", "",
        "1. `prune/tiny-a`: pruned from parent to 754,816 parameters (ffn: activation)",
        "2. `distill/tiny-a/short`: distill at 128 tokens of context, 358,400 tokens of stdlib-stream, teacher parent",
        "", "## Results", "",
        "Held-out loss is mean next-token cross-entropy (nats/token) on the family's held-out data; every checkpoint "
        "of the child is scored on the same tokens.", "",
        "| checkpoint | held-out loss | cascadec_perplexity_x |",
        "| --- | ---: | ---: |",
        "| tiny-a/pruned | 3.5000 | bits_per_byte 1.25 |",
        "| tiny-a/short (this model) | 2.2500 | bits_per_byte 0.875 |",
        "", "Load it with `transformers.AutoModelForCausalLM.from_pretrained(PATH)`; nothing from cascadec is needed.",
        ""])


def test_the_model_card_shows_one_loss_column_per_context_and_marks_untrained_lengths(tmp_path):
    model = save_model(tmp_path / "m", "mistral", seed=0)
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"checkpoints": {
        "tiny-a/short": {"loss": 3.25, "trained_context": 128, "contexts": {
            "128": {"loss": 3.25, "beyond_trained": False}, "512": {"loss": 3.5, "beyond_trained": True}}},
        "tiny-a/long": {"loss": 3.375, "trained_context": 512, "contexts": {
            "128": {"loss": 3.375, "beyond_trained": False}, "512": {"loss": 3.0, "beyond_trained": False}}}}}))
    stage = {"id": "export/tiny-a", "kind": "export", "hash": "t",
             "inputs": [{"role": "checkpoint:tiny-a/long"}, {"role": "eval"}],
             "config": {"names": ["long"], "checkpoints": ["tiny-a/long"], "card": CARD}}
    ctx = context(tmp_path / "run", stage, {"checkpoint:tiny-a/long": model, "eval": ev}, {})
    export.run(ctx)
    card = (ctx.out / "long" / "README.md").read_text()
    assert tf.AutoModelForCausalLM.from_pretrained(ctx.out / "long").num_parameters() > 0
    assert "\n".join([
        "| checkpoint | held-out loss at 128 tokens | held-out loss at 512 tokens |",
        "| --- | ---: | ---: |",
        "| tiny-a/short | 3.2500 | 3.5000 † |",
        "| tiny-a/long (this model) | 3.3750 | 3.0000 |"]) in card
    assert "(at each context length; † marks a length longer than the checkpoint was trained on)." in card
