"""LoRA adapters for a checkpoint that stores fused projections (Phi-3's qkv_proj, gate_up_proj; FUSED).

Our decoder keeps q/k/v and gate/up as separate modules, each with its own LoRA; PEFT on the transformers
model puts one LoRA on the fused module: A (R, in), B (sum of the parts' outputs, R), scale s. Both ways
are exact:

  save  parts with their own A_i (r_i, in), B_i (o_i, r_i), scales s_i become one LoRA of rank R = sum r_i:
        A = cat(A_i) (R, in), B = blockdiag(B_i * s_i / s) with s = s_1, since B @ A = stack(B_i @ A_i).
        A part without LoRA is a zero block. When every part holds the same A and scale (a loaded PEFT
        adapter, untouched) the rank stays r: A = A_1, B = cat(B_i).
  load  a fused LoRA whose B is block-diagonal (each column of B feeds one part's rows, parts in order)
        splits back into parts of rank r_i = that part's columns, with A_i = A's matching rows; a part
        with no columns gets no LoRA. Any other B (dense: PEFT trained it fused) gives every part the
        whole A and its rows of B, rank R each: B_i @ A = the fused update's rows, so it is exact too,
        at R / r_i times the parts' LoRA compute. Into a model that has LoRA already (resuming), the blocks
        are its ranks first, so an adapter saved before training (B = 0, no blocks to read) loads back.
  DoRA  the magnitude is per output row, so it is cut and concatenated with the rows; saving DoRA needs
        every part targeted (an untargeted part's magnitude would be its weight's row norms).
"""

from __future__ import annotations

import math

import torch

from lora_engine.io.safetensors import CheckpointError
from lora_engine.lora.layers import LoraConfig, LoraLinear, lora_scale
from lora_engine.models.families import FUSED


def fused_modules(model) -> dict[str, tuple[str, ...]]:
    """{stored module suffix: its parts} for a model whose checkpoint fuses projections, else {}."""
    config = getattr(model, "config", None)
    if not getattr(config, "fused_projections", False):
        return {}
    return FUSED.get(config.model_type, {})


def _stored(path: str, fused: dict) -> tuple[str, str, int] | None:
    """'model.layers.3.self_attn.k_proj' -> ('model.layers.3.self_attn.qkv_proj', 'self_attn.qkv_proj', 1)."""
    for stored, parts in fused.items():
        for i, part in enumerate(parts):
            if path.endswith("." + part) and path.startswith("model.layers."):
                return path[: -len(part)] + stored, stored, i
    return None


def stored_paths(model, paths: list[str]) -> list[str]:
    """The paths as the checkpoint names them (parts replaced by their fused module), in order, once each."""
    fused = fused_modules(model)
    out = []
    for p in paths:
        s = _stored(p, fused)
        q = s[0] if s else p
        if q not in out:
            out.append(q)
    return out


def fuse_layers(model, layers: dict[str, LoraLinear]) -> dict[str, dict]:
    """{stored path: {"r", "lora_alpha", "lora_A", "lora_B"[, "magnitude"]}}: each fused module's parts as one
    LoRA (see the module docstring); other layers as they are."""
    fused = fused_modules(model)
    groups: dict[str, dict] = {}
    for path, m in layers.items():
        s = _stored(path, fused)
        key, stored, i = s if s else (path, None, 0)
        groups.setdefault(key, {"stored": stored, "parts": {}})["parts"][i] = (path, m)
    out = {}
    for key, g in groups.items():
        if g["stored"] is None:
            (path, m), = g["parts"].values()
            out[key] = _record(m.r, m.lora_alpha, m.lora_A, m.lora_B, m.lora_magnitude_vector if m.use_dora else None)
        else:
            out[key] = _fuse(model, key, key[: -len(g["stored"])], fused[g["stored"]], g["parts"])
    return out


def _record(r, alpha, a, b, magnitude) -> dict:
    rec = {"r": r, "lora_alpha": alpha, "lora_A": a.detach().cpu().contiguous(),
           "lora_B": b.detach().cpu().contiguous()}
    if magnitude is not None:
        rec["magnitude"] = magnitude.detach().cpu().contiguous()
    return rec


def _fuse(model, key: str, prefix: str, names: tuple[str, ...], parts: dict[int, tuple[str, LoraLinear]]) -> dict:
    outs = [model.get_submodule(prefix + n).out_features for n in names]
    present = [parts[i][1] for i in sorted(parts)]
    first = present[0]
    dora = first.use_dora
    if dora and len(parts) != len(names):
        missing = [prefix + names[i] for i in range(len(names)) if i not in parts]
        raise ValueError(f"save_adapter: {key} is one fused module in the checkpoint and DoRA on it needs LoRA on "
                         f"all its parts; {', '.join(missing)} has none: target all of {', '.join(names)}")
    magnitude = torch.cat([m.lora_magnitude_vector.detach().cpu() for m in present]) if dora else None
    shared = all(m.r == first.r and m.scale == first.scale and torch.equal(m.lora_A, first.lora_A) for m in present)
    if len(parts) == len(names) and shared:
        b = torch.cat([m.lora_B.detach().cpu() for m in present])
        return _record(first.r, first.lora_alpha, first.lora_A, b, magnitude)
    rank = sum(m.r for m in present)
    scale = first.scale
    # alpha such that the fused LoRA's scale equals the first part's: alpha / R (or / sqrt(R) with rsLoRA)
    alpha = scale * (math.sqrt(rank) if first.use_rslora else rank)
    a = torch.cat([m.lora_A.detach().cpu() for m in present])
    b = torch.zeros(sum(outs), rank, dtype=first.lora_B.dtype)
    row, col = 0, 0
    for i, out in enumerate(outs):
        if i in parts:
            m = parts[i][1]
            block = m.lora_B.detach().cpu()
            b[row:row + out, col:col + m.r] = block if m.scale == scale else block * (m.scale / scale)
            col += m.r
        row += out
    return _record(rank, alpha, a, b, magnitude)


def split_adapter(model, config: LoraConfig, tensors: dict[str, torch.Tensor], prefix: str, where: str,
                  ranks_on_model: dict[str, int]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter on fused modules (PEFT on the transformers model) as LoRA on our parts: (a config naming
    every path with its rank and alpha, the tensors under the parts' keys). See the module docstring.
    ranks_on_model: {path: r} of the LoRA already on the model; its blocks are tried first (resuming)."""
    fused = fused_modules(model)
    out, ranks, alphas = {}, {}, {}
    paths = []
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            paths.append(key[len(prefix):-len(".lora_A.weight")])
    for path in paths:
        r, alpha = config.rank_and_alpha(path)
        a, b = tensors[f"{prefix}{path}.lora_A.weight"], tensors.get(f"{prefix}{path}.lora_B.weight")
        mag = tensors.get(f"{prefix}{path}.lora_magnitude_vector")
        stored = next((s for s in fused if path.endswith("." + s) and path.startswith("model.layers.")), None)
        if stored is None or b is None:
            pieces = {path: (r, alpha, a, b, mag)}
        else:
            pieces = _split(model, path, stored, fused[stored], r, alpha, config.use_rslora, a, b, mag, where,
                            ranks_on_model)
        for p, (pr, palpha, pa, pb, pm) in pieces.items():
            ranks[p], alphas[p] = pr, palpha
            out[f"{prefix}{p}.lora_A.weight"] = pa
            if pb is not None:
                out[f"{prefix}{p}.lora_B.weight"] = pb
            if pm is not None:
                out[f"{prefix}{p}.lora_magnitude_vector"] = pm
    for key, t in tensors.items():  # modules_to_save and anything unexpected: checked by the caller
        if not key.endswith((".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")):
            out[key] = t
    if not ranks:
        return config, out
    split = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                       target_modules=tuple(ranks), use_rslora=config.use_rslora, rank_pattern=ranks,
                       alpha_pattern=alphas, use_dora=config.use_dora, modules_to_save=config.modules_to_save)
    return split, out


def _split(model, path, stored, names, r, alpha, rslora, a, b, magnitude, where, ranks_on_model) -> dict:
    prefix = path[: -len(stored)]
    parts = [f"{prefix}{n}" for n in names]
    outs = [model.get_submodule(p).out_features for p in parts]
    if b.ndim != 2 or b.shape[0] != sum(outs) or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise CheckpointError(f"{where}: {path}.lora_B is {tuple(b.shape)} and lora_A {tuple(a.shape)}; this model's "
                              f"fused {stored} needs lora_B ({sum(outs)}, r) for its parts {', '.join(names)} "
                              f"({', '.join(map(str, outs))} rows); was the adapter made for another base model?")
    rows = torch.tensor(outs).cumsum(0).tolist()
    bounds = list(zip([0] + rows[:-1], rows, strict=True))
    owners = _model_blocks(b, bounds, [ranks_on_model.get(p) for p in parts]) or _column_owners(b, bounds)
    pieces = {}
    if owners is not None and (magnitude is None or len(set(owners)) == len(parts)):
        scale = lora_scale(r, alpha, rslora)
        for i, (p, (lo, hi)) in enumerate(zip(parts, bounds, strict=True)):
            cols = [c for c, o in enumerate(owners) if o == i]
            if not cols:
                continue  # this part's rows of B are zero: no update, no LoRA
            c0, c1 = cols[0], cols[-1] + 1
            ri = c1 - c0
            # alpha giving this part the fused scale: alpha / r_i (or / sqrt(r_i) with rsLoRA) = scale
            pieces[p] = (ri, scale * (math.sqrt(ri) if rslora else ri), a[c0:c1].contiguous(),
                         b[lo:hi, c0:c1].contiguous(), None if magnitude is None else magnitude[lo:hi].contiguous())
        return pieces
    for p, (lo, hi) in zip(parts, bounds, strict=True):
        pieces[p] = (r, alpha, a.contiguous(), b[lo:hi].contiguous(),
                     None if magnitude is None else magnitude[lo:hi].contiguous())
    return pieces


def _model_blocks(b: torch.Tensor, bounds, ranks: list[int | None]) -> list[int] | None:
    """Column owners from the ranks of the LoRA on the model, when they add up to B's columns and B is zero
    outside those blocks (a zero block is ambiguous to _column_owners: an adapter saved before training)."""
    if not any(ranks) or sum(r or 0 for r in ranks) != b.shape[1]:
        return None
    owners = [i for i, r in enumerate(ranks) for _ in range(r or 0)]
    for i, (lo, hi) in enumerate(bounds):
        outside = torch.tensor([o != i for o in owners])
        if (b[lo:hi, outside] != 0).any():
            return None
    return owners


def _column_owners(b: torch.Tensor, bounds) -> list[int] | None:
    """Which part each column of B feeds, when B is block-diagonal with the parts in order; else None."""
    nonzero = torch.stack([(b[lo:hi] != 0).any(0) for lo, hi in bounds])  # (parts, R)
    owners = []
    for c in range(b.shape[1]):
        who = nonzero[:, c].nonzero().flatten().tolist()
        if len(who) > 1:
            return None
        owners.append(who[0] if who else None)
    known = [o for o in owners if o is not None]
    if not known or known != sorted(known):
        return None
    # a zero column adds nothing: it joins the part before it (or the first part's block at the start)
    last = known[0]
    for c, o in enumerate(owners):
        owners[c] = last = o if o is not None else last
    return owners
