"""Safe, honest loading of state dicts from local files.

Every file goes through ``torch.load(weights_only=True)``, so a pickle payload is refused
rather than run. DDP/compile prefixes are stripped. Missing or unexpected keys are an error
that lists them; only the replaced classifier's keys may be absent or differ in shape.

Usage:
    state = read_state_dict("resnet18.pth")
    load_matching(model, state, optional_prefixes=("fc.",), source="resnet18.pth")
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

from transferlab.errors import UserError

log = logging.getLogger(__name__)

PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and torch.compile


def safe_torch_load(path: str | Path) -> object:
    """``torch.load`` with ``weights_only=True``; every failure is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling error"
        raise UserError(
            f"{path} was refused: it holds more than tensors and plain data ({first[:200]}). "
            "Only load files you trust, and re-save them as a plain state dict."
        ) from None
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise UserError(
            f"{path} is corrupt or not a PyTorch file ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` and ``_orig_mod.`` prefixes (repeatedly, in any order)."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (or a transferlab checkpoint's ``model`` entry) from a local file."""
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        is_run_ckpt = "config" in obj
        obj = obj["model"]
        if is_run_ckpt:  # a transferlab Classifier: keep its backbone, whose keys lack "backbone."
            obj = {
                k[len("backbone.") :]: v
                for k, v in strip_prefixes(obj).items()
                if k.startswith("backbone.")
            }
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return strip_prefixes(obj)


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_matching(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    optional_prefixes: tuple[str, ...],
    source: str,
) -> None:
    """Load ``state`` strictly, except keys under ``optional_prefixes`` (the replaced classifier).

    Those may be missing, or present with another shape (a head for other classes): they are
    skipped. Any other missing, unexpected or mis-shaped key is an error listing the keys.
    """
    own = model.state_dict()

    def optional(k: str) -> bool:
        return any(k.startswith(p) for p in optional_prefixes)

    missing = sorted(k for k in own if k not in state and not optional(k))
    unexpected = sorted(k for k in state if k not in own and not optional(k))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape and not optional(k)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_listing(shapes)}")
        raise UserError(
            f"weights in {source} do not match the {type(model).__name__} architecture; "
            + "; ".join(parts)
        )
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    skipped = sorted(k for k in state if k not in usable)
    if skipped:
        log.info(
            "weights %s: skipped classifier keys %s (replaced by our head)",
            source,
            _listing(skipped),
        )
    model.load_state_dict(usable, strict=False)
