"""gpt-oss (transformers' gpt_oss) as options of the one decoder: the pieces no other family has.

  attention sinks   a learned logit per head (`self_attn.sinks`, (H,)) joins each query's softmax as one
                    more column with no value: probs = softmax([scores, sink])[:-1], so a query may put
                    weight "nowhere" and its outputs need not sum to one value row
  layers            sliding-window and full attention alternating (layer_types; the first sliding),
                    biases on q, k, v and o (attention_bias, default true), RMSNorm as w * x_hat in fp32
  router            `mlp.router` (weight (E, D), bias (E,)): logits, top-k of the logits, softmax over the k
  experts           stored (E, K, N) as transformers keeps them: gate_up_proj (E, D, 2F) with gate and up
                    interleaved (gate = [..., ::2], up = [..., 1::2]) and gate_up_proj_bias (E, 2F),
                    down_proj (E, F, D) and down_proj_bias (E, D); the grouped op takes (E, N, K), so it is
                    given the transposed views (no copy)
  clamped SwiGLU    gate clamped above at `limit`, up to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate)
  YaRN RoPE         rope_type "yarn": the frequencies blended between interpolated (/ factor) and original by
                    a linear ramp over the dimensions, and cos/sin times the attention factor (transformers'
                    _compute_yarn_parameters; the rotary embedding multiplies cos and sin, not the scores)

A saved transformers checkpoint stores every tensor under these in-memory names (3-D experts included),
so it loads by name and our saved folder is the same layout. The released checkpoints store the experts
in MXFP4 (`<name>_blocks`, `<name>_scales`, quantization_config quant_method "mxfp4"): read_mxfp4 dequantizes
them exactly (io/mxfp4.py) while they are read, and a folder we save holds them dequantized.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lora_engine.io import mxfp4
from lora_engine.io.safetensors import CheckpointError, LoadHook, StoredTensor
from lora_engine.models import moe

MODEL_TYPE = "gpt_oss"
# transformers' GptOssConfig defaults: the RoPE when config.json gives none, and its rope_theta.
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
DEFAULT_THETA = 150000.0
DEFAULT_WINDOW = 128


# ---- config ------------------------------------------------------------------------------------------
def gpt_oss_fields(cfg: dict, where: str) -> dict:
    """ModelConfig's gpt-oss fields (beyond the MoE sizes of families._moe_fields)."""
    quant = cfg.get("quantization_config")
    if quant is not None and not is_mxfp4(cfg):
        raise CheckpointError(f"{where}: quantization_config {quant!r:.80} is not supported for gpt_oss; "
                              "supported: quant_method 'mxfp4' (the released checkpoints), read dequantized")
    out = dict(attn_sinks=True, moe_style=MODEL_TYPE, norm_style="olmo")
    for key, name, default in (("swiglu_alpha", "swiglu_alpha", 1.702), ("swiglu_limit", "swiglu_limit", 7.0)):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < math.inf:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {v!r:.60}")
        out[name] = float(v)
    if cfg.get("attention_dropout") not in (None, 0, 0.0):
        raise CheckpointError(f"{where}: attention_dropout {cfg['attention_dropout']!r:.60} is not supported for "
                              "gpt_oss; supported: 0.0")
    return out


def is_mxfp4(cfg: dict) -> bool:
    """Whether config.json `cfg` says its experts are stored in MXFP4."""
    quant = cfg.get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"


def rope_parameters(cfg: dict) -> dict:
    """The RoPE parameters as GptOssConfig reads them: rope_parameters, else rope_scaling (the released
    config.json), else its YaRN default; rope_theta from the file, else 150000."""
    given = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    rope = dict(given) if isinstance(given, dict) else dict(DEFAULT_ROPE) if given is None else given
    if isinstance(rope, dict) and rope.get("rope_theta") is None:
        rope["rope_theta"] = cfg.get("rope_theta") if cfg.get("rope_theta") is not None else DEFAULT_THETA
    return rope


def check_yarn(rope: dict, where: str, max_positions: int) -> None:
    """A yarn rope_parameters dict as _compute_yarn_parameters reads it; CheckpointError naming the field.
    Fills `factor` (when null: max_position_embeddings / original) so the decoder needs no config."""
    original = rope.get("original_max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, numbers.Integral) or original <= 0:
        raise CheckpointError(f"{where}: yarn rope scaling needs original_max_position_embeddings, a whole number "
                              f"> 0, got {original!r:.60}")
    if rope.get("factor") is None:
        rope["factor"] = max_positions / original
    for key in ("factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
        v = rope.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf):
            raise CheckpointError(f"{where}: yarn rope scaling {key} must be a number >= 0, got {v!r:.60}")
    if rope["factor"] < 1:
        raise CheckpointError(f"{where}: rope scaling factor must be at least 1, got {rope['factor']}")
    if not isinstance(rope.get("truncate", True), bool):
        raise CheckpointError(f"{where}: yarn rope scaling truncate must be true or false, "
                              f"got {rope['truncate']!r:.60}")


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def yarn_attention_factor(s: dict) -> float:
    """What cos and sin are multiplied by: attention_factor, else from factor (and mscale, mscale_all_dim)."""
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    if s.get("mscale") and s.get("mscale_all_dim"):
        return _mscale(s["factor"], s["mscale"]) / _mscale(s["factor"], s["mscale_all_dim"])
    return _mscale(s["factor"])


def yarn_inv_freq(dim: int, base: float, s: dict) -> torch.Tensor:
    """(dim / 2,) inverse frequencies: interpolated (/ factor) below the correction range, original above,
    a linear ramp between (the range from beta_fast and beta_slow rotations over the original length)."""
    factor, original = s["factor"], s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # weight of the original frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


# ---- attention with sinks ---------------------------------------------------------------------------
SINK_CHUNK_ELEMENTS = 2**25  # scores of at most this many elements at a time: 128 MiB in fp32


def sink_attention(q, k, v, sinks, mask, scale: float, chunk_elements: int = SINK_CHUNK_ELEMENTS) -> torch.Tensor:
    """Softmax attention whose denominator has one more term per head, exp(sinks[h]) (transformers' eager
    gpt-oss attention). The fused attention kernels of lora_engine.dispatch do not take sinks yet, so this
    PyTorch expression (O(T * S) scores, fp32 softmax) runs for the layers that have them.

    q (B, H, T, hd); k, v (B, Hk, S, hd); mask: bool (B, 1, T, S) of allowed keys, or None (causal over
    the last T of S keys when T > 1, every key for one query) -> (B, H, T, hd).
    Each query's softmax is its own, so the queries go in chunks whose (B, H, rows, S) scores hold at most
    `chunk_elements`, each chunk recomputed in backward (torch.utils.checkpoint): whole, the fp32 scores,
    their softmax and the bf16 probabilities of 2,048 tokens x 64 heads are 3 GiB, held through backward."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    rows = max(1, chunk_elements // (B * H * S))
    if rows >= T:
        return _sink_attention(q, k, v, sinks, mask, scale)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    out = [checkpoint(_sink_attention, q[:, :, i : i + rows], k, v, sinks, mask[..., i : i + rows, :], scale,
                      use_reentrant=False) for i in range(0, T, rows)]
    return torch.cat(out, dim=2)


def _sink_attention(q, k, v, sinks, mask, scale: float) -> torch.Tensor:
    B, H, T, _ = q.shape
    S, rep = k.shape[2], H // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * scale  # (B, H, T, S)
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    logits = torch.cat([scores, sinks.float().view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :-1]  # the sink column takes its share, then is dropped
    return torch.matmul(probs.to(v.dtype), v)


# ---- mixture of experts --------------------------------------------------------------------------------
def clamped_swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """h (..., 2F) with gate and up interleaved -> (..., F)."""
    gate, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class GptOssExperts(moe.Experts):
    """E clamped-SwiGLU MLPs with biases, stored (E, K, N) (transformers' GptOssExperts)."""

    def __init__(self, num_experts: int, hidden: int, inner: int, alpha: float, limit: float):
        nn.Module.__init__(self)  # Experts' (E, N, K) parameters are not this layout
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * inner))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * inner))
        self.down_proj = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))
        self.alpha, self.limit = alpha, limit
        self.backend: str | None = None

    def grouped_weight(self, name: str) -> torch.Tensor:
        return getattr(self, name).transpose(1, 2)  # (E, K, N) stored -> the (E, N, K) view the op takes

    def forward(self, x, counts):
        # x (M, D) grouped by expert -> (M, D)
        h = moe._grouped(x, counts, self.grouped_weight("gate_up_proj"), self.gate_up_proj_bias,
                         *self.factors("gate_up_proj"), self.backend)
        h = clamped_swiglu(h, self.alpha, self.limit)
        return moe._grouped(h, counts, self.grouped_weight("down_proj"), self.down_proj_bias,
                            *self.factors("down_proj"), self.backend)


class GptOssMoE(moe.MoEBlock):
    """The router with a bias and the softmax after the top-k, over GptOssExperts."""

    def __init__(self, cfg):
        nn.Module.__init__(self)  # MoEBlock's `gate` router is `router` here (the checkpoint's name)
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=True)
        self.experts = GptOssExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                     cfg.swiglu_alpha, cfg.swiglu_limit)
        self.top_k = cfg.experts_per_token
        self.norm_topk_prob = False
        self.chunk_size = 0
        self.router_logits: torch.Tensor | None = None

    def route(self, flat):
        logits = self.router(flat)  # (N, E)
        top, experts = torch.topk(logits, self.top_k, dim=-1)  # (N, k)
        return logits, torch.softmax(top, dim=-1, dtype=top.dtype), experts  # the model's dtype, as transformers


# ---- the MXFP4 expert checkpoint -----------------------------------------------------------------------
def read_mxfp4(expected: dict, stored: set, hook: LoadHook | None, where) -> LoadHook | None:
    """For a checkpoint storing expert parameters `<name>` (E, K, N) as MXFP4 `<name>_blocks` (E, N, K/32, 16)
    and `<name>_scales` (E, N, K/32) (their names in `stored`): `expected` gets those two (meta tensors of
    their shapes, so the loader checks them) in place of the parameter, and the returned hook reads both and
    dequantizes them into the parameter one expert at a time (never the whole layer in fp32), every other tensor
    going to `hook`. Else `hook`. Quantizing on load (QLoRA), `hook.put_expert(name, e, slice)` takes each
    dequantized (K, N) slice instead (quant/nf4_experts.py loading_hook): MXFP4 to NF4, one expert at a time."""
    names = [n for n in expected if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))
             and n + "_blocks" in stored]
    if not names:
        return hook
    put = getattr(hook, "put_expert", None)
    if hook is not None and put is None:
        raise CheckpointError(f"{where}: the experts are stored in MXFP4; this loader cannot take them: load the "
                              "model in bf16 or fp32, or quantize it to NF4 on load")
    targets, parts = {}, {}
    for name in names:
        E, K, N = expected[name].shape
        if K % mxfp4.BLOCK:
            raise CheckpointError(f"{where}: {name} has {K} inputs, not a multiple of MXFP4's block of "
                                  f"{mxfp4.BLOCK}: config.json does not describe these weights")
        targets[name] = expected.pop(name)
        expected[name + "_blocks"] = torch.empty((E, N, K // mxfp4.BLOCK, mxfp4.BLOCK // 2), device="meta")
        expected[name + "_scales"] = torch.empty((E, N, K // mxfp4.BLOCK), device="meta")

    def read(t: StoredTensor) -> bool:
        base, _, kind = t.name.rpartition("_")
        if base not in targets or kind not in ("blocks", "scales"):
            return hook is not None and hook(t)
        if t.dtype != torch.uint8:
            raise CheckpointError(f"{t.name} in {t.file.name} is {t.dtype}; MXFP4 blocks and scales are uint8")
        got = parts.setdefault(base, {})
        got[kind] = t.read()
        if len(got) == 2:  # both halves read: dequantize, then drop them
            p, blocks, scales = targets[base], got["blocks"], got["scales"]
            with torch.no_grad():
                for e in range(p.shape[0]):  # (N, K) dequantized -> the (K, N) slice stored
                    w = mxfp4.dequantize(blocks[e], scales[e], torch.float32).T
                    if put is None:
                        p.data[e].copy_(w)
                    else:
                        put(base, e, w.contiguous())
            del parts[base]
        return True

    return read
