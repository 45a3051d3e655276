"""Loading a bundle's weights into its built network: a state dict only (``torch.load(weights_only=True)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.errors import BundleError


def load_weights(network: Any, path: str | Path, *, strict: bool = True) -> Any:
    """Load the state dict at ``path`` into ``network`` and return it. A checkpoint dict holding the weights
    under ``"model"``/``"state_dict"`` (as MONAI's ``CheckpointSaver`` writes) is accepted. Never unpickles
    code: :class:`BundleError` names the file on anything else."""
    import torch

    file = Path(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BundleError(f"{file}: no such weights file") from None
    except Exception as exc:  # corrupt file, a pickle with code (refused by weights_only), ...
        raise BundleError(f"{file}: cannot read a state dict: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict", "network"):
            if isinstance(state.get(key), dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise BundleError(f"{file}: expected a state dict, got {type(state).__name__}")
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise BundleError(f"{file}: does not fit the bundle's network_def: {exc}") from None
    return network
