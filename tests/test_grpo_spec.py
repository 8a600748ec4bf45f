"""GRPO settings in the spec: the Magistral preset by default, TRL's names and preset, lowered into the plan."""

from __future__ import annotations

from test_author_mistakes import edit, outcome, stage

BASE = edit(
    ('format: chat}}', 'format: chat},\n  prompts: {kind: jsonl, paths: ["data/prompts/*.jsonl"], format: prompts}}'),
    ("children:\n", "judges:\n  math: {kind: math_answer}\nchildren:\n"),
) + """\
    variants:
      reasoning:
        - {name: grpo, kind: grpo, from: short, data: prompts, prompts: 1K, seq_len: 2048, rewards: [math]SETTINGS}
"""
GRPO = "grpo/small/reasoning/grpo"


def planned(settings: str = "") -> dict:
    diags, plan = outcome(BASE.replace("SETTINGS", settings))
    assert diags == []
    return stage(plan, GRPO)


def test_the_magistral_preset_is_the_default():
    s = planned()
    c = s["config"]
    assert {k: c[k] for k in ("preset", "beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards",
                              "mask_truncated_completions", "drop_constant_groups", "refill_rounds",
                              "num_iterations")} == {
        "preset": "magistral", "beta": 0.0, "epsilon": 0.2, "epsilon_high": 0.28, "loss_type": "magistral",
        "scale_rewards": "minibatch", "mask_truncated_completions": False, "drop_constant_groups": True,
        "refill_rounds": 2, "num_iterations": 1}
    assert s["provenance"]["config.loss_type"] == "default: the magistral preset"
    assert not any(i["role"] == "reference" for i in s["inputs"])


def test_trl_names_and_preset_reach_the_plan_with_their_provenance():
    s = planned(", preset: trl, epsilon: 0.3, num_generations: 4, max_completion_length: 512, "
                "mask_truncated_completions: true, beta: 0.04")
    c, prov = s["config"], s["provenance"]
    assert (c["loss_type"], c["scale_rewards"], c["epsilon"], c["epsilon_high"], c["drop_constant_groups"]) == \
           ("dapo", "group", 0.3, 0.3, False)  # TRL: epsilon_high unset = epsilon
    assert (c["generation"]["samples"], c["generation"]["max_new_tokens"], c["beta"]) == (4, 512, 0.04)
    assert c["mask_truncated_completions"] is True
    assert prov["config.generation.samples"].endswith(".num_generations")
    assert prov["config.epsilon"].endswith(".epsilon") and prov["config.loss_type"].endswith(".preset")


def test_clip_is_cascadecs_spelling_of_epsilon():
    c = planned(", clip: {low: 0.1, high: 0.3}, loss_type: dr_grpo, scale_rewards: none")["config"]
    assert (c["epsilon"], c["epsilon_high"], c["loss_type"], c["scale_rewards"]) == (0.1, 0.3, "dr_grpo", "none")


def test_a_grpo_micro_batch_counts_completions_over_the_devices():
    """batch {global: 16, micro: 4} over 8 devices: 16 prompts are not 4 × 8, but their 16 × 8
    completions are, and grpo's micro batch counts completions, so the plan is made; 3 devices
    with 4 samples (64 completions, not a multiple of 12) are refused in grpo's words."""
    s = planned(", resources: {devices: 8, strategy: fsdp}, generation: {samples: 8}")
    assert (s["config"]["global_batch"], s["config"]["micro_batch"], s["launch"]["devices"]) == (16, 4, 8)
    diags, _ = outcome(BASE.replace("SETTINGS", ", resources: {devices: 3}, generation: {samples: 4}"))
    assert [str(d) for d in diags] == [
        "23:130: error[CSC223]: 'small/reasoning/grpo': global batch 16 prompts x 4 samples = 64 completions is not a "
        "multiple of micro batch 4 x 3 devices | grpo's `batch.micro` counts completions: set `batch.global` x "
        "`generation.samples` to a multiple of 12, or change `batch.micro` or `resources.devices` | notes: "
        "batch.global = 16 is set at defaults.batch.global (line 12); batch.micro = 4 is set at defaults.batch.micro "
        "(line 12); generation.samples = 4 is set at children[0].variants.reasoning[0].generation.samples (line 23)"]
