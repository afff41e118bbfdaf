"""The NF4 storage format, byte-compatible with bitsandbytes (quant_type="nf4").

Layout of a weight W of shape (out, in), flattened row-major to n = out*in elements:
  - blocks of `blocksize` consecutive elements (32..4096, a power of two); the last block may be short.
  - absmax[b] = max |W[block b]| in fp32, one per block (n_blocks = ceil(n / blocksize)).
  - q[i] = index (0..15) of the code value nearest to W[i] / absmax[b]; NF4_CODE below, sorted.
  - packed[i] = q[2i] << 4 | q[2i+1] (first element in the high nibble), uint8 (ceil(n/2),);
    an odd count is padded with the index of 0.0 (nibble 7), as bitsandbytes pads the scaled values
    with 0. bitsandbytes stores it with shape (ceil(n/2), 1).
  - W'[i] = NF4_CODE[q[i]] * absmax[i // blocksize], computed in fp32 and cast once to the dtype.
Double quantization (bitsandbytes' compress_statistics=True):
  - offset = mean(absmax) (fp32); absmax - offset is quantized blockwise (blocks of 256) to uint8
    indices into the signed 8-bit dynamic map DYNAMIC_MAP_SIGNED, with an fp32 absmax per 256 blocks
    (nested_absmax). Decoded: absmax[b] = DYNAMIC_MAP_SIGNED[qabsmax[b]] * nested_absmax[b // 256] + offset.
  - Storage: 4 bits + 8/blocksize + 32/(256*blocksize) bits per parameter, ~4.127 bits at blocksize 64.
This module only describes the format (torch only); quantization lives in kernels/nf4_reference.py
(PyTorch) and csrc/nf4.cpp, dequantization there and in kernels/nf4_triton.py, all chosen by
lora_engine/dispatch.py; lora_engine/quant/nf4.py applies them to a model. The format's sources and
bitsandbytes' CPU quirks: docs/nf4_format.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import torch

from lora_engine.kernels.dtypes import FLOAT_DTYPES

# bitsandbytes' NF4 table (functional.py get_4bit_type("nf4")), index -> value, sorted ascending.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes.functional.quantize_4bit allows
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax with blocks of 256


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 code values, fp32 (16,)."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (functional.create_dynamic_map), fp32 (256,), sorted.

    Recomputed with the same fp32 linspace and Python-float arithmetic as bitsandbytes, so the
    values are identical bit for bit (tests/test_nf4.py checks it against the real function).
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        bounds = torch.linspace(0.1, 1, int(n_items), dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


NF4_CODE = nf4_code()
DYNAMIC_MAP_SIGNED = create_dynamic_map(signed=True)


def _tensor_nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class NF4Tensor:
    """A frozen weight in NF4. Holds tensors only; see the module docstring for the layout.

    packed: uint8 (ceil(numel/2),); absmax: fp32 (n_blocks,), or uint8 (n_blocks,) when nested;
    code: fp32 (16,); nested_absmax: fp32 (ceil(n_blocks/256),); nested_code: fp32 (256,);
    nested_offset: the mean that was subtracted from absmax before its 8-bit quantization.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    # Not part of the format: lets code that treats NF4Tensor like a frozen Parameter ask.
    requires_grad: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when the tensors do not describe a weight of `shape`."""
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4Tensor: blocksize {self.blocksize} not allowed; use one of {BLOCKSIZES}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"NF4Tensor: dtype {self.dtype} not supported; use one of {FLOAT_DTYPES}")
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (self.numel + 1) // 2:
            raise ValueError(
                f"NF4Tensor: packed must be uint8 with ceil({self.numel}/2) = {(self.numel + 1) // 2} bytes for "
                f"shape {self.shape}, got {self.packed.dtype} with {self.packed.numel()}"
            )
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(
                f"NF4Tensor: absmax has {self.absmax.numel()} entries but shape {self.shape} with blocksize "
                f"{self.blocksize} has {self.n_blocks} blocks: the quantization state does not belong to this weight"
            )
        if self.code.numel() != 16:
            raise ValueError(f"NF4Tensor: code must have 16 values, got {self.code.numel()}")
        if self.is_nested:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"NF4Tensor: a double-quantized absmax must be uint8, got {self.absmax.dtype}")
            need = math.ceil(self.n_blocks / self.nested_blocksize)
            if self.nested_absmax.numel() != need or self.nested_code is None or self.nested_offset is None:
                raise ValueError(
                    f"NF4Tensor: double quantization needs nested_absmax ({need} values for {self.n_blocks} "
                    f"blocks), nested_code (256) and nested_offset; got nested_absmax "
                    f"{self.nested_absmax.numel()}, nested_code {self.nested_code is not None}, "
                    f"nested_offset {self.nested_offset}"
                )
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"NF4Tensor: absmax must be float32 (or uint8 with nested state), got {self.absmax.dtype}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def is_nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """All storage: packed data, absmax, both code tables and the nested absmax."""
        return sum(_tensor_nbytes(t) for t in (self.packed, self.absmax, self.code, self.nested_absmax,
                                                self.nested_code))

    def to(self, device) -> NF4Tensor:
        """A copy on `device` (the format keeps its dtypes; `dtype` stays the dequantization default)."""
        mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return replace(self, packed=mv(self.packed), absmax=mv(self.absmax), code=mv(self.code),
                       nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code))

    def dim(self) -> int:
        return len(self.shape)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes saves for this weight under `prefix` (e.g. "model.layers.0.mlp.up_proj.")."""
        return to_bnb_state_dict(self, prefix)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "", where: str = "state dict") -> NF4Tensor:
        """Inverse of state_dict: read the bitsandbytes keys under `prefix`; `where` names the source in errors."""
        return from_bnb_state_dict(sd, prefix, where)

    def size(self, dim: int | None = None):
        """Like Tensor.size: the original (dequantized) shape."""
        return torch.Size(self.shape) if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        nest = f", nested(offset={self.nested_offset:.6g})" if self.is_nested else ""
        return (f"NF4Tensor(shape={self.shape}, dtype={self.dtype}, blocksize={self.blocksize}{nest}, "
                f"device={self.device})")


# ---- bitsandbytes' state-dict layout (bitsandbytes.functional.QuantState.as_dict(packed=True)) ------------------
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}


def to_bnb_state_dict(w: NF4Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """{prefix + "weight": uint8 (ceil(n/2), 1), "weight.absmax", "weight.quant_map", [nested...],
    "weight.quant_state.bitsandbytes__nf4": uint8 JSON bytes} exactly as transformers + bitsandbytes save."""
    p = prefix + "weight"
    qs = {"quant_type": "nf4", "blocksize": w.blocksize, "dtype": str(w.dtype).removeprefix("torch."),
          "shape": list(w.shape)}
    out = {p: w.packed.reshape(-1, 1), f"{p}.absmax": w.absmax, f"{p}.quant_map": w.code}
    if w.is_nested:
        out[f"{p}.nested_absmax"] = w.nested_absmax
        out[f"{p}.nested_quant_map"] = w.nested_code
        qs.update(nested_blocksize=w.nested_blocksize, nested_dtype="float32", nested_offset=w.nested_offset)
    out[f"{p}.{QUANT_STATE_KEY}"] = torch.tensor(list(json.dumps(qs).encode("utf-8")), dtype=torch.uint8)
    return out


def _quant_state_json(raw: torch.Tensor, key: str, where: str) -> dict:
    try:
        qs = json.loads(bytes(raw.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
        if not isinstance(qs, dict):
            raise ValueError("not a JSON object")
        shape = tuple(int(d) for d in qs["shape"])
        blocksize = int(qs["blocksize"])
        dtype = _DTYPE_NAMES[qs["dtype"]]
        quant_type = qs["quant_type"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{where}: {key} is not a valid bitsandbytes quant state ({type(e).__name__}: {e}); it must be the "
            "UTF-8 JSON bytes with quant_type, blocksize, dtype and shape: the checkpoint is corrupted"
        ) from e
    if quant_type != "nf4":
        raise ValueError(f"{where}: {key} has quant_type {quant_type!r}; only 'nf4' is supported (not fp4)")
    return {"shape": shape, "blocksize": blocksize, "dtype": dtype, "raw": qs}


def from_bnb_state_dict(sd: dict[str, torch.Tensor], prefix: str = "", where: str = "state dict") -> NF4Tensor:
    """Build an NF4Tensor from bitsandbytes' keys under `prefix`; ValueError naming the key when one is
    missing or does not fit the others."""
    p = prefix + "weight"
    key = f"{p}.{QUANT_STATE_KEY}"
    for k in (p, key, f"{p}.absmax", f"{p}.quant_map"):
        if k not in sd:
            raise ValueError(f"{where}: missing {k} (an NF4 weight needs {p}, its .absmax, .quant_map and "
                             f".{QUANT_STATE_KEY})")
    qs = _quant_state_json(sd[key], key, where)
    packed = sd[p]
    if packed.dtype != torch.uint8:
        raise ValueError(f"{where}: {p} has dtype {packed.dtype}; a packed NF4 weight is uint8 "
                         "(bnb_4bit_quant_storage other than uint8 is not supported)")
    nested = f"{p}.nested_absmax" in sd
    raw = qs["raw"]
    try:
        return NF4Tensor(
            packed=packed.reshape(-1), absmax=sd[f"{p}.absmax"].reshape(-1), code=sd[f"{p}.quant_map"].float(),
            blocksize=qs["blocksize"], shape=qs["shape"], dtype=qs["dtype"],
            nested_absmax=sd[f"{p}.nested_absmax"].reshape(-1).float() if nested else None,
            nested_code=sd[f"{p}.nested_quant_map"].float() if nested else None,
            nested_offset=float(raw["nested_offset"]) if nested else None,
            nested_blocksize=int(raw.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )
    except (ValueError, KeyError) as e:
        raise ValueError(f"{where}: the NF4 tensors under {p} do not fit together: {e}") from e
