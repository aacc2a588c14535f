"""The label convention every loss and every sample builder shares: ``IGNORE_INDEX``, the label of a token that is not
scored (prompt tokens, padding).

Its own module, importing nothing, because both ends of the project need the one value: the prompt renderer builds
label lists without torch (so the tokenizer and the readers stay torch-free), and the losses above the model. The
model itself (``transformer_components``) takes the same value from torch, which owns the convention.
"""
from __future__ import annotations

IGNORE_INDEX = -100  # torch's cross_entropy ignore_index default (transformer_components reads it from torch)
