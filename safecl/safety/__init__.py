"""What safecl knows about safety as a training signal, used by training/ and evaluation/ alike.

- :mod:`~safecl.safety.config`: recipe sections of the mechanisms that keep safety through
  task stages (replay, anchors, refusal direction, safety merge).
- :mod:`~safecl.safety.direction`: the refusal direction (difference of mean last-prompt-token
  hidden states, harmful minus harmless), its file, and projections onto it.
- :mod:`~safecl.safety.anchors`: anchor sets (prompts + the teacher's first response tokens)
  and the anchor loss terms (KL to the teacher; refusal-direction projection).
- :mod:`~safecl.safety.sensitivity`: per-entry safety sensitivity (Fisher of the anchors'
  refusal log-likelihood) for safety-aware mask allocation.

This package imports data/, adapters/ and config only: never training/, evaluation/ or recipe/.
"""
