"""cascadec: compile a model-family spec into a cascade-distillation plan."""
__version__ = "0.1.0"
