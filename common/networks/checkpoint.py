"""Reading foreign checkpoints safely and loading key-mapped weights with a report."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..guards import BadInputError, load_weights

__all__ = ["read_state_dict", "load_mapped", "tensors_of"]


def tensors_of(obj) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint (plain, or under 'model' / 'state_dict' /
    'network' / 'model_state_dict'), with DataParallel's ``module.`` prefixes removed."""
    for key in ("model", "state_dict", "network", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return tensors_of(obj[key])
    if not isinstance(obj, dict):
        raise BadInputError(None, f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, loaded with ``weights_only=True``, ``module.`` prefixes removed.

    Raises (:func:`common.guards.load_weights`) ``FileNotFoundError`` for a missing file and
    ``ValueError`` for a file that is not plain tensors (a pickle that needs code to load is
    refused, never executed) or is corrupt.
    """
    raw = load_weights(path, map_location="cpu")
    try:
        return tensors_of(raw)
    except BadInputError as err:
        raise BadInputError(path, err.problem) from None


def load_mapped(model: nn.Module, mapped: dict[str, torch.Tensor], source: str, expected: Iterable[str],
                strict: bool, path: str) -> dict:
    """Load ``mapped`` (already renamed to ``model``'s keys) and report what matched.

    Tensors whose shape differs from the model's are skipped; ``expected`` are the model keys the
    checkpoint should cover. With ``strict``, anything missing, unexpected or reshaped raises.
    Returns ``source``, ``loaded``, ``missing``, ``unexpected``, ``shape_mismatch``.
    """
    own = model.state_dict()
    mismatch = [k for k, v in mapped.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    usable = {k: v for k, v in mapped.items() if k in own and k not in mismatch}
    unexpected = sorted(k for k in mapped if k not in own)
    missing = sorted(k for k in expected if k not in usable)
    if strict and (missing or unexpected or mismatch):
        raise ValueError(
            f"checkpoint {path} ({source}) does not match {type(model).__name__}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatch)} with another shape "
            f"(first: {(missing + unexpected + mismatch)[:5]})"
        )
    model.load_state_dict(usable, strict=False)
    return dict(source=source, loaded=len(usable), missing=missing, unexpected=unexpected, shape_mismatch=mismatch)
