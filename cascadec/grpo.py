"""GRPO settings: the presets, their TRL names, and how a step's options resolve into the plan.

Shared by `lower` (which options a grpo step may carry), `graph` (the plan's resolved values and
their provenance), `checks` (CSC350–CSC355) and `cascadec.runtime.stages.grpo` (which reads the
plan), so the defaults live in one place. Pure, torch-free. What each setting does: docs/runtime.md,
"GRPO".
"""

from __future__ import annotations

# The settings a grpo step resolves, named as TRL's GRPOConfig names them where TRL has them.
# `magistral` (the default) is Magistral's §2.1 recipe; `trl` is GRPOConfig's defaults (TRL 1.16),
# for a run that must match a TRL one. `refill_rounds` and `drop_constant_groups` have no TRL
# counterpart (TRL keeps constant groups in the batch with advantage 0).
PRESETS: dict[str, dict] = {
    "magistral": {"beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.28, "loss_type": "magistral",
                  "scale_rewards": "minibatch", "mask_truncated_completions": False, "drop_constant_groups": True,
                  "refill_rounds": 2, "num_iterations": 1, "reward_workers": 2},
    "trl": {"beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.2, "loss_type": "dapo", "scale_rewards": "group",
            "mask_truncated_completions": False, "drop_constant_groups": False, "refill_rounds": 0,
            "num_iterations": 1, "reward_workers": 2},
}
DEFAULT_PRESET = "magistral"
SETTINGS = tuple(PRESETS[DEFAULT_PRESET])
LOSS_TYPES = ("magistral", "grpo", "dr_grpo", "dapo")
SCALES = ("minibatch", "group", "batch", "none")
# TRL's names for settings cascadec keeps elsewhere: spec key -> (setting path, cascadec's spelling)
ALIASES = {"num_generations": ("generation.samples", "generation: {samples: N}"),
           "max_completion_length": ("generation.max_new_tokens", "generation: {max_new_tokens: N}")}
# the step keys only a grpo step may carry
STEP_KEYS = ("preset", *(k for k in SETTINGS if k != "beta"), *ALIASES)


def resolve(options: dict) -> tuple[dict, dict]:
    """(settings, provenance key -> 'spec' | 'preset:<name>'): the step's options over its preset.

    ``clip: {low, high}`` (cascadec's spelling) gives ``epsilon`` / ``epsilon_high``; an
    ``epsilon_high`` left unset under a preset that clips symmetrically follows ``epsilon``."""
    preset = options.get("preset", DEFAULT_PRESET)
    out, prov = dict(PRESETS[preset]), dict.fromkeys(SETTINGS, f"preset:{preset}")
    clip = options.get("clip") or {}
    given = {**({"epsilon": clip["low"]} if "low" in clip else {}),
             **({"epsilon_high": clip["high"]} if "high" in clip else {}),
             **{k: options[k] for k in SETTINGS if k in options}}
    for key, value in given.items():
        out[key], prov[key] = value, "spec"
    if "epsilon" in given and "epsilon_high" not in given and preset == "trl":
        out["epsilon_high"] = out["epsilon"]  # TRL: epsilon_high None = epsilon
    return {"preset": preset, **out}, prov
