"""The example family specs, installed as `cascadec.specs` so that `cascadec init` finds them."""
