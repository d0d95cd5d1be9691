"""SPRY layer splitting: deal groups of trainable tensors to a round's clients."""
from __future__ import annotations

from typing import Sequence


def split_groups(groups: Sequence[Sequence[int]], clients: Sequence[str], round_index: int,
                 shared: Sequence[int] = (), contiguous: bool = False) -> dict:
    """Map client -> tuple of param ids it perturbs.

    Groups (e.g. lora_A + lora_B of one layer) are dealt round-robin, rotated by
    the round so every group is visited. With more clients than groups, groups
    are reused (each client still gets exactly one group), so no client is idle
    and nothing fails; with more groups than clients, clients get several.
    `shared` ids (e.g. a classifier head) go to every client.

    `contiguous`: with at least as many groups as clients, each client gets one run of consecutive
    groups (in model order: a block of layers) instead of every C-th group, so its tangents are zero
    below its block and the forward there runs without them.
    """
    if not clients:
        return {}
    if not groups:
        return {c: tuple(shared) for c in clients}
    G, C = len(groups), len(clients)
    out = {c: list(shared) for c in clients}
    if G >= C and contiguous:
        for b in range(C):
            out[clients[(b + round_index) % C]].extend(i for g in groups[b * G // C:(b + 1) * G // C] for i in g)
    elif G >= C:
        for g in range(G):
            out[clients[(g + round_index) % C]].extend(groups[g])
    else:
        for i, c in enumerate(clients):
            out[c].extend(groups[(i + round_index) % G])
    return {c: tuple(dict.fromkeys(v)) for c, v in out.items()}
