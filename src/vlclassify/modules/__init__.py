"""Reusable blocks kept apart from the methods that use them (TorchMultimodal style):
`fusions/` (cross-attention, keyless attention, ...), `losses/` (triplet, focal, contrastive, ...)
and `heads.py`. Write a block once here; methods import it."""
