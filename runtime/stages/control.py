"""The `control` stage: a from-scratch model of a child's shape, trained on the child's tokens.

Owns building that model: the template input (any checkpoint of the family, usually the parent)
gives the architecture's remaining settings and the tokenizer; ``config.shape`` the axes. It is
the baseline that shows what pruning + distillation bought, so nothing but the init differs.
"""

from __future__ import annotations

from transformers import AutoTokenizer

from cascadec.shapes import Shape, from_hf_config, hf_config_updates

from ..context import StageContext
from ..training.fsdp import empty_on_this_rank
from ..training.models import init_model, load_config
from ..training.train import train


def run(ctx: StageContext) -> dict:
    config = ctx.config
    template = ctx.inputs["template"]
    model_config = load_config(template)
    shape = Shape(**config["shape"])
    family = from_hf_config(model_config.to_dict()).family
    if shape.family != family:
        raise ValueError(f"control shape is a {shape.family} model but the template {template} is {family}")
    for key, value in hf_config_updates(shape).items():
        setattr(model_config.get_text_config(), key, value)
    model_config.tie_word_embeddings = shape.tied_embeddings
    model = init_model(model_config, seed=int(config.get("seed", 0)), rope=config.get("rope"),
                       empty=empty_on_this_rank(ctx.stage))
    ctx.log(f"control: random {shape.family} model, {sum(p.numel() for p in model.parameters()):,} parameters")
    return train(ctx, model, AutoTokenizer.from_pretrained(template), template)
