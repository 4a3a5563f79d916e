"""Weight arithmetic between models of one architecture: full fine-tuning carried over to a dedicated
(inpaint/depth) model by "add difference" (dedicated + (fine-tuned - base)), and whether two models hold the same
weights.
"""
from __future__ import annotations

import torch

from sdtune.generation.requests import ParameterError


@torch.no_grad()
def add_difference(dedicated: torch.nn.Module, finetuned: torch.nn.Module, base: torch.nn.Module,
                   what: str = "UNet") -> list[str]:
    """In place: ``dedicated += finetuned - base`` for every tensor of the same shape in all three.

    Tensors whose shape differs (an inpaint/depth UNet's wider ``conv_in``) keep the dedicated
    model's values. Returns the names that were kept unchanged. Computed in fp32.
    """
    d_sd, f_sd, b_sd = dedicated.state_dict(), finetuned.state_dict(), base.state_dict()
    comparable = [k for k in f_sd if k in b_sd and f_sd[k].shape == b_sd[k].shape]
    if len(comparable) < 0.9 * len(f_sd):
        raise ParameterError("{base} does not match the fine-tuned model's {what} (different architecture); "
                             "pass the model it was fine-tuned from", what=what)
    kept = []
    for name, tensor in d_sd.items():
        if name in f_sd and name in b_sd and f_sd[name].shape == b_sd[name].shape == tensor.shape:
            diff = f_sd[name].to(tensor.device).float() - b_sd[name].to(tensor.device).float()
            tensor.copy_((tensor.float() + diff).to(tensor.dtype))
        else:
            kept.append(name)
    return kept


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold the same tensors under the same names (bit for bit)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)
