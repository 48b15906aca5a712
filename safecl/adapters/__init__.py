"""LoRI adapters: frozen seeded A, stage-split B, sparse disjoint masks, PEFT export."""

from safecl.adapters.inject import (adapters_off, inject_adapters, restore, snapshot, stage_switched_off,
                                    trainable_parameters)
from safecl.adapters.layer import LoRILinear, seeded_projection

__all__ = ["LoRILinear", "seeded_projection", "inject_adapters", "trainable_parameters",
           "snapshot", "restore", "stage_switched_off", "adapters_off"]
