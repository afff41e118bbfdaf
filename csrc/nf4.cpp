// NF4 quantize / dequantize on the CPU, registered as torch ops lora_engine::nf4_quantize and
// lora_engine::nf4_dequantize (OpenMP over blocks). Bit-exact with kernels/nf4_reference.py, which
// is bit-exact with bitsandbytes 0.50.2; the format is described in kernels/nf4_format.py.
//
// Versions:
//   nf4_quantize   one thread per run of blocks: absmax, scale (reciprocal for full blocks, a
//                  division for the short last one, as bitsandbytes does), count of code midpoints
//                  below the scaled value (= torch.bucketize), two nibbles per byte.
//   nf4_dequantize one thread per run of blocks: a 256-entry table byte -> (code[hi], code[lo]),
//                  times the block's fp32 absmax, one rounding to the output dtype.
// The double-quantized absmax is decoded (or encoded) in PyTorch by the caller: it is 1/64 of the
// data. Build: `pip install --no-build-isolation -e .` (setup.py compiles csrc/*.cpp into
// lora_engine._C with -O3 -fopenmp -ffp-contract=off: no fused multiply-add, so every product
// rounds exactly as the PyTorch reference does). Check: pytest tests/test_nf4_cpp.py.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int kCodeSize = 16;

template <typename T>
inline float load_as_float(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Number of midpoints strictly below x: torch.bucketize(x, midpoints, right=False).
inline uint8_t nearest_code(float x, const float* mid) {
  uint8_t q = 0;
  for (int j = 0; j < kCodeSize - 1; ++j) q += mid[j] < x;
  return q;
}

template <typename T>
void quantize_impl(const T* w, int64_t n, int64_t blocksize, const float* code, uint8_t* packed, float* absmax) {
  float mid[kCodeSize - 1];
  for (int j = 0; j < kCodeSize - 1; ++j) mid[j] = (code[j] + code[j + 1]) / 2.0f;
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  const int64_t full_blocks = n / blocksize;
  // blocksize is even, so a block starts on a byte boundary and only the very last byte can be half full.
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = std::min(start + blocksize, n);
    float am = 0.0f;
    for (int64_t i = start; i < end; ++i) am = std::max(am, std::fabs(load_as_float(w, i)));
    const bool full = b < full_blocks;
    float inv = 0.0f, div = 0.0f;
    if (full) {
      inv = 1.0f / std::max(am, 1e-38f);
      absmax[b] = am;
    } else {
      div = std::max(am, 1e-38f);
      absmax[b] = div;  // bitsandbytes keeps the clamped value for the short last block
    }
    for (int64_t i = start; i < end; i += 2) {
      uint8_t q[2] = {7, 7};  // padding nibble: bucketize(0.0) is index 7 (code value 0)
      for (int k = 0; k < 2 && i + k < end; ++k) {
        const float x = load_as_float(w, i + k);
        float s = full ? x * inv : x / div;
        s = std::min(1.0f, std::max(-1.0f, s));
        q[k] = nearest_code(s, mid);
      }
      packed[i / 2] = static_cast<uint8_t>((q[0] << 4) | q[1]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& w, const at::Tensor& code, int64_t blocksize) {
  TORCH_CHECK(w.device().is_cpu(), "lora_engine::nf4_quantize: w must be a CPU tensor, got ", w.device());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == kCodeSize,
              "lora_engine::nf4_quantize: code must be float32 (16,)");
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0, "lora_engine::nf4_quantize: blocksize must be even, got ",
              blocksize);
  auto wc = w.contiguous().view(-1);
  auto cc = code.contiguous();
  const int64_t n = wc.numel();
  auto packed = at::empty({(n + 1) / 2}, w.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, w.options().dtype(at::kFloat));
  // An odd count leaves a half byte: bitsandbytes pads the scaled values with 0.0, i.e. nibble 7.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "nf4_quantize", [&] {
    quantize_impl<scalar_t>(wc.data_ptr<scalar_t>(), n, blocksize, cc.data_ptr<float>(),
                            packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  });
  return {packed, absmax};
}

template <typename T>
void dequantize_impl(const uint8_t* packed, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                     T* out) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = std::min(start + blocksize, n);
    const float scale = absmax[b];
    float table[kCodeSize];
    for (int j = 0; j < kCodeSize; ++j) table[j] = code[j] * scale;  // fp32 product, as the reference
    int64_t i = start;
    for (; i + 1 < end; i += 2) {
      const uint8_t byte = packed[i / 2];
      out[i] = static_cast<T>(table[byte >> 4]);
      out[i + 1] = static_cast<T>(table[byte & 0xF]);
    }
    if (i < end) out[i] = static_cast<T>(table[packed[i / 2] >> 4]);
  }
}

at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                          int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte,
              "lora_engine::nf4_dequantize: packed must be a uint8 CPU tensor");
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "lora_engine::nf4_dequantize: packed has ", packed.numel(),
              " bytes, ", numel, " values need ", (numel + 1) / 2);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == (numel + blocksize - 1) / blocksize,
              "lora_engine::nf4_dequantize: absmax must be float32 with one value per block of ", blocksize);
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == kCodeSize,
              "lora_engine::nf4_dequantize: code must be float32 (16,)");
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0, "lora_engine::nf4_dequantize: blocksize must be even");
  auto pc = packed.contiguous();
  auto ac = absmax.contiguous();
  auto cc = code.contiguous();
  auto out = at::empty({numel}, packed.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize", [&] {
    dequantize_impl<scalar_t>(pc.data_ptr<uint8_t>(), ac.data_ptr<float>(), cc.data_ptr<float>(), numel,
                              blocksize, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lora_engine, m) {
  m.def("nf4_quantize(Tensor w, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, Tensor code, int blocksize, int numel, ScalarType dtype)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_engine, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize);
  m.impl("nf4_dequantize", &nf4_dequantize);
}

// Importing lora_engine._C registers the ops above; the module itself exposes nothing else.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "lora_engine C++ ops: torch.ops.lora_engine.*"; }
