"""The training loop, its distillation losses, the teacher-logits cache format, model loading."""
