"""A minimal Llama-family decoder with Hugging Face's module names.

One idea over ~520 lines: the one decoder every family is an option of (the families' own pieces live in
families.py, moe.py, hybrid.py and gpt_oss.py; the cache, masks and loss stay here because every family uses them).

Module paths equal the checkpoint keys (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`),
so a Hugging Face checkpoint and a PEFT adapter map onto this model one to one, with no renaming.
The model knows nothing of LoRA or quantization: those swap `nn.Linear` modules by name. The hot
ops (RMSNorm, RoPE, SwiGLU, attention, the loss) go through lora_engine.dispatch.

Shapes: B batch, T query length, S key length (past + T), H query heads, Hk key/value heads,
hd head dim, D hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora_engine import dispatch
from lora_engine.models import families, gpt_oss, hybrid, moe, rebuild
from lora_engine.models.config import SLIDING, ModelConfig
from lora_engine.models.offload import HostOffloader, checkpoint_offloaded, offload_to_device
from lora_engine.models.recompute import chunked_rows
from lora_engine.models.softcap import softcapped_cross_entropy


class RMSNorm(nn.Module):
    """style "llama": the dispatched kernel (w * x_hat cast to x's dtype first). "gemma" (x_hat * (1 + w))
    and "olmo" (w * x_hat) multiply in fp32 and cast once, as their transformers classes do: the PyTorch
    expression, which the fused kernels do not compute. "none": x_hat alone, no weight (Gemma 4's v_norm)."""

    def __init__(self, dim: int, eps: float, style: str = "llama"):
        super().__init__()
        if style != "none":
            self.weight = nn.Parameter(torch.zeros(dim) if style == "gemma" else torch.ones(dim))
        self.eps = eps
        self.style = style
        self.backend: str | None = None

    def forward(self, x):
        if self.style == "llama":
            return dispatch.rms_norm(x, self.weight, self.eps, backend=self.backend)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.style == "none":
            return h.to(x.dtype)
        w = self.weight.float()
        return (h * (1.0 + w) if self.style == "gemma" else w * h).to(x.dtype)

    def into(self, x, fn):
        """fn(self(x)), keeping no copy of self(x) for backward (models/rebuild.py)."""
        if self.style != "llama":
            return fn(self(x))
        return rebuild.rms_norm_into(x, self.weight, self.eps, fn, backend=self.backend)


class Rotary(nn.Module):
    """cos/sin tables for rotate-half RoPE, computed in fp32 like transformers, cast to x's dtype."""

    def __init__(self, cfg: ModelConfig, rope: dict | None = None, head_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.head_dim = head_dim or cfg.head_dim  # Gemma 4: its full layers' heads are wider
        # rope: one layer type's parameters (cfg.sliding_rope); None: the config's own.
        self.theta = rope["rope_theta"] if rope else cfg.rope_theta
        self.scaling = (None if rope["rope_type"] == "default" else rope) if rope else cfg.rope_scaling
        kind = self.scaling["rope_type"] if self.scaling else "default"
        # longrope: inv_freq holds the short factors' frequencies, inv_freq_long the long ones'; a forward whose
        # positions pass original_max_position_embeddings takes the long set for all (transformers' rule).
        self.longrope = self.scaling["original_max_position_embeddings"] if kind == families.LONGROPE else None
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        if self.longrope:
            self.register_buffer("inv_freq_long", self._inv_freq(long=True), persistent=False)
        # YaRN and longrope multiply cos and sin (so every score) by their attention factor; 1 for the others
        self.attention_scaling = gpt_oss.yarn_attention_factor(self.scaling) if kind == "yarn" else \
            families.longrope_attention_factor(self.scaling, cfg.max_position_embeddings) if self.longrope else 1.0

    def _inv_freq(self, long: bool = False) -> torch.Tensor:
        dim, base = int(self.head_dim * self.cfg.partial_rotary_factor), self.theta  # partial RoPE: leading dims
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        s = self.scaling
        if s is None:
            return inv_freq
        if self.longrope:
            return families.longrope_inv_freq(dim, base, s, long)
        if s["rope_type"] == "proportional":  # Gemma 4: the first angles turn, the others are 0 (dims kept as is)
            angles = int(s.get("partial_rotary_factor", 1.0) * dim // 2)
            turned = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / dim))
            return torch.cat([turned, torch.zeros(dim // 2 - angles)]) / s.get("factor", 1.0)
        if s["rope_type"] == "linear":
            return inv_freq / s["factor"]
        if s["rope_type"] == "yarn":
            return gpt_oss.yarn_inv_freq(dim, base, s)
        # Llama-3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)

    def reset_buffers(self):
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)
        if self.longrope:
            self.inv_freq_long = self._inv_freq(long=True).to(self.inv_freq.device)

    def stale(self, past: int, T: int) -> bool:
        """Whether T more tokens after `past` cached ones pass the original length that the cache's keys,
        rotated with the short factors, were under: transformers then recomputes the whole sequence."""
        return bool(self.longrope) and 0 < past <= self.longrope < past + T

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # position_ids: (B, T) -> cos, sin: (B, T, rotary dims)
        inv_freq = self.inv_freq
        if self.longrope:  # torch.where, not an if: traceable, as transformers' longrope_frequency_update
            inv_freq = torch.where(position_ids.max() + 1 > self.longrope, self.inv_freq_long, self.inv_freq)
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.attention_scaling != 1.0:
            return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class KVCache:
    """Preallocated keys and values for incremental decoding: per layer (B, Hk, max_len, hd). A linear-attention
    layer (Qwen3.5) has no keys (None) but a recurrent state (hybrid.LinearState), filled by its first forward."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shapes = [(batch, *cfg.attention_dims(i)[:1], max_len, cfg.attention_dims(i)[1])
                  for i in range(cfg.num_hidden_layers)]
        attends = [cfg.layer_type(i) != hybrid.LINEAR for i in range(cfg.num_hidden_layers)]
        self.k = [torch.zeros(sh, dtype=dtype, device=device) if a else None for sh, a in zip(shapes, attends)]
        self.v = [torch.zeros(sh, dtype=dtype, device=device) if a else None for sh, a in zip(shapes, attends)]
        self.linear = {i: hybrid.LinearState() for i, a in enumerate(attends) if not a}
        self.max_len = max_len
        self.pos = 0  # tokens already stored

    def select_rows(self, rows: torch.Tensor, extra: int) -> KVCache:
        """A new cache whose row i holds this cache's row rows[i] (its pos positions), with room for
        `extra` more: one prefix read once, then continued several ways (suite.py's choices)."""
        new = object.__new__(KVCache)
        new.max_len, new.pos = self.pos + extra, self.pos

        def pick(t):
            if t is None:
                return None
            out = t.new_zeros((rows.numel(), t.shape[1], new.max_len, t.shape[3]))
            out[:, :, : self.pos] = t[:, :, : self.pos].index_select(0, rows)
            return out

        new.k, new.v = [pick(t) for t in self.k], [pick(t) for t in self.v]
        new.linear = {i: s.select_rows(rows) for i, s in self.linear.items()}
        return new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos} used, {t} more asked")
        self.k[layer][:, :, self.pos : self.pos + t] = k
        self.v[layer][:, :, self.pos : self.pos + t] = v
        return self.k[layer][:, :, : self.pos + t], self.v[layer][:, :, : self.pos + t]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        (Hk, hd), D, H = cfg.attention_dims(layer), cfg.hidden_size, cfg.num_attention_heads
        self.n_head, self.n_kv, self.head_dim = H, Hk, hd
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, Hk * hd, bias=cfg.qkv_bias)
        # Gemma 4's full layers with attention_k_eq_v: the values are the key projection (before its norm)
        self.k_is_v = cfg.attention_k_eq_v and cfg.layer_type(layer) != SLIDING
        if not self.k_is_v:
            self.v_proj = nn.Linear(D, Hk * hd, bias=cfg.qkv_bias)
        if cfg.v_norm:
            self.v_norm = RMSNorm(hd, cfg.rms_norm_eps, "none")
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head's vector; OLMo 2: over the projection
            self.q_norm = RMSNorm(H * hd if cfg.qk_norm_full else hd, cfg.rms_norm_eps, cfg.norm_style)
            self.k_norm = RMSNorm(Hk * hd if cfg.qk_norm_full else hd, cfg.rms_norm_eps, cfg.norm_style)
        self.qk_norm_full = cfg.qk_norm_full
        sliding = cfg.layer_type(layer) == SLIDING
        self.window = cfg.sliding_window if sliding else None  # keys q - window < k <= q
        self.rope_kind = "sliding" if sliding and cfg.sliding_rope else "full"  # which cos/sin tables
        self.use_rope = cfg.rope_layers[layer] if cfg.rope_layers else True
        self.scale = (cfg.query_scale or hd) ** -0.5
        self.softcap = cfg.attn_softcap
        if cfg.attn_sinks:  # gpt-oss: one learned logit per head in every softmax's denominator
            self.sinks = nn.Parameter(torch.zeros(H))
        self.backend: str | None = None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        v = (k if self.k_is_v else self.v_proj(x)).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "v_norm"):
            v = self.v_norm(v)
        v = v.transpose(1, 2)
        if self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm") and not self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.use_rope and cos.shape[-1] < self.head_dim:  # partial RoPE (Phi-4-mini): the leading dims only
            r = cos.shape[-1]
            q_rot, k_rot = dispatch.rope(q[..., :r].contiguous(), k[..., :r].contiguous(), cos, sin,
                                         backend=self.backend)
            q, k = torch.cat([q_rot, q[..., r:]], -1), torch.cat([k_rot, k[..., r:]], -1)
        elif self.use_rope:
            q, k = dispatch.rope(q, k, cos, sin, backend=self.backend)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hk, S, hd)
        # No mask (no padding, packing or cache, _attention_mask): the window goes to attention as itself.
        window = self.window if mask is None and self.window is not None and self.window < T else None
        if hasattr(self, "sinks"):  # the dispatched kernels take no sinks yet (models/gpt_oss.py), nor a window
            if window is not None:
                mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().triu(1 - window)
            y = gpt_oss.sink_attention(q, k, v, self.sinks, mask, self.scale)
        else:
            y = dispatch.attention(q, k, v, mask is None and T > 1, self.scale, mask, backend=self.backend,
                                   softcap=self.softcap, window=window)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, F_ = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(D, F_, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(F_, D, bias=cfg.mlp_bias)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"  # GeGLU (Gemma) instead of SwiGLU
        self.backend: str | None = None
        self.chunk_size = 0  # > 0: that many tokens at a time, recomputed in backward (models/recompute.py)

    def forward(self, x):
        if self.chunk_size:
            return chunked_rows(self._rows, x, [p for p in self.parameters() if p.requires_grad], self.chunk_size)
        return self._rows(x)

    def _rows(self, x):  # (..., D) -> (..., D) through (..., F): each token on its own
        if self.gelu:
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        # swiglu_into: backward rebuilds the (..., F) SwiGLU output that down_proj would keep.
        return rebuild.swiglu_into(self.gate_proj(x), self.up_proj(x), self.down_proj, backend=self.backend)


class DecoderLayer(nn.Module):
    """norm_layout "pre" (Llama): x + attn(norm(x)), then x + mlp(norm(x)). "sandwich" (Gemma): each block's
    output normed too (post_attention_layernorm after attention, pre/post_feedforward_layernorm around
    the MLP). "post" (OLMo 2): no input norm, each block's output normed before the residual add."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        D, eps, style = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_style
        self.layout = cfg.norm_layout
        if self.layout != "post":
            self.input_layernorm = RMSNorm(D, eps, style)
        self.linear = cfg.layer_type(layer) == hybrid.LINEAR  # Gated DeltaNet instead of attention (Qwen3.5)
        if self.linear:
            self.linear_attn = hybrid.GatedDeltaNet(cfg)
        elif cfg.attn_output_gate:
            self.self_attn = hybrid.GatedAttention(cfg, lambda d: RMSNorm(d, eps, style))
        else:
            self.self_attn = Attention(cfg, layer)
        # Which mask (a window size, or the linear layers' padding mask) and cos/sin tables the layer takes.
        self.mask_key = "linear" if self.linear else self.self_attn.window
        self.rope_kind = "full" if self.linear else self.self_attn.rope_kind
        self.post_attention_layernorm = RMSNorm(D, eps, style)
        if self.layout == "sandwich":
            self.pre_feedforward_layernorm = RMSNorm(D, eps, style)
        if self.layout != "pre":
            self.post_feedforward_layernorm = RMSNorm(D, eps, style)
        moe_block = gpt_oss.GptOssMoE if cfg.moe_style == gpt_oss.MODEL_TYPE else moe.MoEBlock
        if cfg.shared_expert:  # Qwen3.5-MoE: the dense MLP beside the experts
            self.mlp = moe.SharedExpertMoE(cfg, MLP(cfg))
        else:
            self.mlp = moe_block(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)
        if cfg.layer_scalar:  # Gemma 4: the layer's output times a stored (not trained) scalar
            self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x, cos, sin, mask, cache, layer):
        if self.linear:  # mask: the (B, T) padding mask; the cache holds the layer's recurrent state
            x = x + self.linear_attn(self.input_layernorm(x), mask, cache.linear[layer] if cache is not None else None)
            return x + self.post_attention_layernorm.into(x, self.mlp)
        if self.layout == "sandwich":
            h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
            x = x + self.post_attention_layernorm(h)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return x * self.layer_scalar if hasattr(self, "layer_scalar") else x
        if self.layout == "post":
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, cache, layer))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        # rms_norm_into: backward rebuilds each norm's output from x for the projections that keep it.
        x = x + self.input_layernorm.into(x, lambda h: self.self_attn(h, cos, sin, mask, cache, layer))
        return x + self.post_attention_layernorm.into(x, self.mlp)


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_style)
        self.rotary_emb = Rotary(cfg, head_dim=cfg.global_head_dim)
        if cfg.sliding_rope:  # the sliding layers' own RoPE (Gemma 3's rope_local_base_freq)
            self.rotary_local = Rotary(cfg, cfg.sliding_rope)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        # With gradient_checkpointing: each layer's input in CPU memory until backward (models/offload.py).
        self.offload_activations = False
        self._offloader = HostOffloader()
        self.backend: str | None = None
        # Tokens per chunk of the loss's (chunk x vocab) logits; 0 = the backend's default.
        self.loss_chunk_size = 0
        # Frozen matrices kept in CPU memory (keep_on_host): the embedding looked up there, the head copied
        # to the device for the loss only.
        self.embedding_on_cpu = False
        self.head_on_cpu = False
        self.aux_loss: torch.Tensor | None = None  # the MoE load-balancing loss of the last forward
        # MoE: add router_aux_loss_coef * aux_loss to loss() (transformers' output_router_logits); off by default
        self.router_aux_loss = False

    @property
    def mlp_chunk_size(self) -> int:
        """Tokens per block of every layer's MLP, recomputed block by block in backward; 0 = unchunked."""
        return self.model.layers[0].mlp.chunk_size if len(self.model.layers) else 0

    @mlp_chunk_size.setter
    def mlp_chunk_size(self, n: int):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"mlp_chunk_size must be a whole number of tokens >= 0 (0 = off), got {n!r}")
        for layer in self.model.layers:
            layer.mlp.chunk_size = n

    def keep_on_host(self, embedding: bool = False, head: bool = False) -> CausalLM:
        """Keep the frozen input embedding and/or output head in CPU memory instead of the device.

        embedding: the (V, D) table stays on the CPU; a step looks up its (B, T) rows there and copies the
        (B, T, D) result to the device (for Llama-3.1-8B: 1 GiB of bf16 off the GPU for 32 KiB per 4k tokens).
        head: the (V, D) head stays in (pinned) CPU memory and is copied whole to the device for the loss (or
        the logits) and freed after it: the loss computes the head's input gradient in its forward, so
        backward needs no head, and the device holds it only while the loss runs (1 GiB host-to-device per
        micro-batch, ~40 ms at 25 GB/s). With tied weights the two are one matrix: either flag moves both.
        Both must be frozen (not in modules_to_save): their gradients would need them on the device.
        """
        tied = self.lm_head.weight is self.model.embed_tokens.weight
        embedding, head = embedding or (tied and head), head or (tied and embedding)
        for flag, name, w in ((embedding, "embedding", self.model.embed_tokens.weight),
                              (head, "head", self.lm_head.weight)):
            if flag and w.requires_grad:
                raise ValueError(f"keep_on_host: the {name} is trained (modules_to_save?); only a frozen matrix "
                                 f"can stay in CPU memory. Drop --{name}-on-cpu or train it elsewhere")
        pin = self.lm_head.weight.device.type == "cuda"
        if head:
            self.lm_head.weight.data = self.lm_head.weight.data.to("cpu").pin_memory() if pin else \
                self.lm_head.weight.data.to("cpu")
        if embedding and not (tied and head):
            self.model.embed_tokens.weight.data = self.model.embed_tokens.weight.data.to("cpu")
        self.embedding_on_cpu, self.head_on_cpu = embedding, head
        return self

    def head_weight(self, device: torch.device) -> torch.Tensor:
        """The head's (V, D) weight on `device`: itself, or with head_on_cpu a fresh device copy (freed when
        the caller drops it)."""
        w = self.lm_head.weight
        return offload_to_device(w.detach(), device) if self.head_on_cpu else w

    # ---- forward -------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, D).

        attention_mask: (B, S) 1 for real tokens, 0 for padding (S = past + T with a cache).
        position_ids:   (B, T); default past..past+T-1 (what transformers uses).
        segment_ids:    (B, T) document index per token for packed rows: attention never crosses a
                        document border (pass position_ids restarting at each document too).
        """
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if cache is not None and self.cache_stale(cache, T):
            raise ValueError(f"the KV cache's {past} positions were rotated with longrope's short factors; "
                             f"{past + T} positions pass original_max_position_embeddings "
                             f"({self.model.rotary_emb.longrope}): run the whole sequence again without the cache")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        # One mask per window size the layers use (None: full attention); one cos/sin pair per RoPE kind.
        masks = {w: _attention_mask(attention_mask, segment_ids, B, T, past, input_ids.device, w)
                 for w in {layer.mask_key for layer in self.model.layers} - {"linear"}}
        if any(layer.linear for layer in self.model.layers):
            masks["linear"] = hybrid.padding_mask(attention_mask, segment_ids, T, self.config.model_type)
        if self.embedding_on_cpu:  # rows gathered in CPU memory, only the (B, T, D) result goes to the device
            emb = self.model.embed_tokens
            x = emb(input_ids.to(emb.weight.device)).to(input_ids.device)
        else:
            x = self.model.embed_tokens(input_ids)
        if self.config.embed_scale:  # sqrt(hidden) rounded to the embedding's dtype first, as transformers does
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(x.dtype)
        if self.config.num_experts:
            moe.forget_router_logits(self.model)
        ropes = {"full": self.model.rotary_emb(position_ids, x.dtype)}
        if hasattr(self.model, "rotary_local"):
            ropes["sliding"] = self.model.rotary_local(position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            (cos, sin), mask = ropes[layer.rope_kind], masks[layer.mask_key]
            if self.gradient_checkpointing and self.training and cache is None and self.offload_activations:
                x = checkpoint_offloaded(lambda h, f=layer, i=i, c=cos, s=sin, m=mask: f(h, c, s, m, None, i), x,
                                         [p for p in layer.parameters() if p.requires_grad], self._offloader)
            elif self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, None, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += T
        # The MoE layers' load-balancing loss of this forward (transformers' aux_loss; not in the loss).
        # A plain loop over MoE blocks: torch.compile cannot trace an assignment expression in a comprehension.
        routed = [layer.mlp.router_logits for layer in self.model.layers
                  if isinstance(layer.mlp, moe.MoEBlock) and layer.mlp.router_logits is not None]
        # Reported only (router_aux_loss off): no graph, so no (tokens, E) fp32 softmax per layer is saved for backward.
        with nullcontext() if self.router_aux_loss else torch.no_grad():
            self.aux_loss = moe.aux_loss(routed, self.config.experts_per_token,
                                         None if attention_mask is None else attention_mask[:, -T:]) if routed else None
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, cache=None):
        """Logits (B, T, V) in the model's dtype."""
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, segment_ids, cache))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head on final-norm hidden states h (..., D) -> (..., V): forward's last step, also for a
        few positions picked out of hidden_states (train/suite.py)."""
        logits = F.linear(h, self.head_weight(h.device), self.lm_head.bias) if self.head_on_cpu else self.lm_head(h)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def loss(self, input_ids, labels, attention_mask=None, reduction="mean", position_ids=None,
             segment_ids=None):
        """Next-token cross-entropy: hidden state t predicts labels[t + 1]; labels of -100 are skipped.

        reduction="mean" averages over counted tokens; "sum" returns the sum, so a training loop can
        normalise by the number of target tokens of a whole accumulated batch. The (tokens x vocab)
        logits are never formed in full (dispatch.linear_cross_entropy works in chunks).
        """
        given_mask = attention_mask
        if attention_mask is not None and segment_ids is None and _padding_unlabelled(attention_mask, labels):
            attention_mask = None  # causal attention gives every counted token the same keys, and is faster
        h = self.hidden_states(input_ids, attention_mask, position_ids, segment_ids)
        D = h.shape[-1]
        h = h[:, :-1].reshape(-1, D)
        target = labels[:, 1:].reshape(-1)
        if self.config.final_softcap is not None:  # the fused losses have no soft-cap: chunked, recomputed
            loss = softcapped_cross_entropy(h, self.head_weight(h.device), target, self.config.final_softcap,
                                            reduction, self.loss_chunk_size or None)
        else:
            loss = dispatch.linear_cross_entropy(
                h, self.head_weight(h.device), target, ignore_index=-100, reduction=reduction,
                backend=self.backend, chunk_size=self.loss_chunk_size or None,
            )
        if self.router_aux_loss and self.aux_loss is not None:
            loss = loss + moe.weighted_aux_loss(self, given_mask, target, reduction)
        return loss

    def tie_weights(self):
        """Share the embedding matrix with the head when the config says so (also after to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def cache_stale(self, cache: KVCache, T: int) -> bool:
        """Whether T more tokens cannot continue `cache` (longrope's switch to the long factors, Rotary.stale)."""
        return self.model.rotary_emb.stale(cache.pos, T)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch, max_len, p.dtype, p.device)

    def reset_buffers(self):
        """Recompute non-persistent buffers (after construction on the meta device)."""
        self.model.rotary_emb.reset_buffers()
        if hasattr(self.model, "rotary_local"):
            self.model.rotary_local.reset_buffers()


def _padding_unlabelled(attention_mask: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether the loss may drop attention_mask: every row is right-padded (its real tokens first)
    and no padding position's hidden state is counted (labels[t + 1] == -100 where mask[t] == 0).
    Then a real query sees keys 0..t under plain causal attention as under the mask, and the padding
    rows, whose outputs differ, contribute nothing to the loss or its gradients."""
    if attention_mask.dim() != 2 or attention_mask.shape != labels.shape or attention_mask.shape[1] < 2:
        return False
    m = attention_mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all() and (labels[:, 1:][~m[:, :-1]] == -100).all())


def _attention_mask(attention_mask, segment_ids, B, T, past, device, window=None):
    """Boolean (B, 1, T, S) mask for SDPA, or None when plain causal attention is all we need.
    window: keys q - window < k <= q only (a sliding layer). With no padding, packing or cache there is no
    mask: the layer passes its window to attention, O(S x W); the other cases keep it in this O(S^2) mask."""
    if attention_mask is None and segment_ids is None and past == 0:
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None].expand(B, T, S)
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)[None]
    if attention_mask is not None:
        if attention_mask.shape != (B, S):
            raise ValueError(
                f"attention_mask must be (batch, past + length) = {(B, S)}, got {tuple(attention_mask.shape)}"
            )
        allowed = allowed & attention_mask.bool()[:, None, :]
    if segment_ids is not None:
        if past:
            raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    # A padding query may have no key left; let it see itself so SDPA returns numbers, not NaN.
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]
