// NF4 quantize / dequantize on the CPU, registered as torch ops lora_engine::nf4_quantize and
// lora_engine::nf4_dequantize (OpenMP over blocks). Bit-exact with kernels/nf4_reference.py, which
// is bit-exact with bitsandbytes 0.50.2; the format is described in kernels/nf4_format.py.
//
// Versions:
//   nf4_quantize   one thread per run of blocks: absmax, scale (reciprocal for full blocks, a
//                  division for the short last one, as bitsandbytes does), count of code midpoints
//                  below the scaled value (= torch.bucketize), two nibbles per byte.
//   nf4_dequantize one thread per run of blocks: the block's absmax (decoded from double
//                  quantization on the fly when nested), a 16-entry table code[j] * absmax rounded
//                  to the output dtype, then one lookup per value. On CPUs with AVX-512BW/VL
//                  (checked at run time) the table is one vmulps and one rounding in a register
//                  and the lookups are vpermw / vpermps, 32 or 16 values per instruction; on
//                  AVX2 CPUs fp32 output (their default) by two vpermps and a blend, 8 values a
//                  step. The same bits as the scalar loop (the products are the same IEEE
//                  multiplications, the roundings bf16's round-to-nearest-even and vcvtps2ph's,
//                  which torch's own vectorised casts use).
// Threads only for >= 65536 values. The double quantization itself is encoded by the caller in
// PyTorch (kernels/nf4_reference.py: it is 1/64 of the data).
// Build: `pip install --no-build-isolation -e .` (setup.py compiles csrc/*.cpp into
// lora_engine._C with -O3 -fopenmp -ffp-contract=off: no fused multiply-add, so every product
// rounds exactly as the PyTorch reference does). Check: pytest tests/test_nf4_cpp.py.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LE_NF4_X86 1
#endif

namespace {

constexpr int kCodeSize = 16;
// Parallel only when there is enough work: a team of threads costs more than a small weight.
constexpr int64_t kParallelMin = 1 << 16;

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
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = std::min(start + blocksize, n);
    float am = 0.0f;
    for (int64_t i = start; i < end; ++i) {
      const float a = std::fabs(load_as_float(w, i));
      am = (a > am || a != a) ? a : am;  // a NaN sticks (std::max would drop it), so the caller sees it
    }
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

// The absmax of block b: fp32 as stored, or decoded from double quantization exactly as the reference
// does: code2[q] * absmax2[b / 256], rounded, then + offset, rounded (two operations, no fma).
struct Absmax {
  const float* fp32;  // set when not nested
  const uint8_t* q;
  const float* code2;
  const float* absmax2;
  int64_t group;
  float offset;
  inline float operator()(int64_t b) const {
    if (fp32) return fp32[b];
    const float scaled = code2[q[b]] * absmax2[b / group];
    return scaled + offset;
  }
};

// Values [i, end) of a block by its table, two nibbles a byte (i even: a block starts on a byte).
template <typename T>
inline void lookup(const uint8_t* packed, const T* table, int64_t i, int64_t end, T* out) {
  for (; i + 1 < end; i += 2) {
    const uint8_t byte = packed[i / 2];
    out[i] = table[byte >> 4];
    out[i + 1] = table[byte & 0xF];
  }
  if (i < end) out[i] = table[packed[i / 2] >> 4];
}

// Blocks [b0, b1), one value at a time: the path of every CPU without the vector ones below.
template <typename T>
void dequantize_blocks_scalar(const uint8_t* packed, const Absmax& absmax, const float* code, int64_t n,
                              int64_t blocksize, T* out, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const float scale = absmax(b);
    // The 16 values a block can hold, each rounded to T once here (fp32 product, as the reference,
    // then the one rounding): the lookups are then loads and stores, no per-value conversion.
    T table[kCodeSize];
    for (int j = 0; j < kCodeSize; ++j) table[j] = static_cast<T>(code[j] * scale);
    lookup(packed, table, start, std::min(start + blocksize, n), out);
  }
}

#ifdef LE_NF4_X86
#define LE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// Which vector path dequantize takes: the best the CPU has, or what LORA_ENGINE_NF4_SIMD asks for
// (auto | avx2 | none; tests/test_nf4_cpp.py runs each on one CPU). Read once per process.
enum class Simd { kNone, kAvx2, kAvx512 };

Simd simd_level() {
  static const Simd level = [] {
    const char* env = std::getenv("LORA_ENGINE_NF4_SIMD");
    const std::string want = env ? env : "auto";
    TORCH_CHECK(want == "auto" || want == "avx2" || want == "none",
                "LORA_ENGINE_NF4_SIMD must be auto, avx2 or none, got '", want, "'");
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    const bool avx2 = __builtin_cpu_supports("avx2");
    if (want == "none") return Simd::kNone;
    if (want == "auto" && avx512) return Simd::kAvx512;
    return avx2 ? Simd::kAvx2 : Simd::kNone;
  }();
  return level;
}

// c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0; 16 lanes.
LE_AVX512 inline __m256i bf16_rne(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// The 16 table entries code[j] * scale of one block, rounded to T, in the low lanes of a register.
template <typename T>
LE_AVX512 inline __m512i block_table(__m512 code, float scale) {
  const __m512 prod = _mm512_mul_ps(code, _mm512_set1_ps(scale));
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_castps_si512(prod);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi256_si512(bf16_rne(prod));
  } else {
    return _mm512_castsi256_si512(_mm512_cvtps_ph(prod, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// Blocks [b0, b1): per block the table, then 32 (16-bit T) or 16 (fp32) values per lookup
// instruction; a block's tail that is not a whole vector goes through the stored table.
template <typename T>
LE_AVX512 void dequantize_blocks_avx512(const uint8_t* packed, const Absmax& absmax, const float* code, int64_t n,
                                        int64_t blocksize, T* out, int64_t b0, int64_t b1) {
  constexpr bool wide = sizeof(T) == 4;
  constexpr int64_t step = wide ? 16 : 32;
  const __m512 cv = _mm512_loadu_ps(code);
  const __m512i low4 = wide ? _mm512_set1_epi64(0xF) : _mm512_set1_epi32(0xF);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = std::min(start + blocksize, n);
    const __m512i table = block_table<T>(cv, absmax(b));
    int64_t i = start;
    for (; i + step <= end; i += step) {
      if constexpr (wide) {  // 8 bytes -> 8 qwords -> 16 dword indices [hi0, lo0, hi1, lo1, ...]
        const __m512i q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2)));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi64(q, 4), _mm512_slli_epi64(_mm512_and_si512(q, low4), 32));
        _mm512_storeu_ps(reinterpret_cast<float*>(out + i), _mm512_permutexvar_ps(idx, _mm512_castsi512_ps(table)));
      } else {  // 16 bytes -> 16 dwords -> 32 word indices
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2)));
        const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(_mm512_and_si512(d, low4), 16));
        _mm512_storeu_si512(reinterpret_cast<void*>(out + i), _mm512_permutexvar_epi16(idx, table));
      }
    }
    if (i < end) {
      alignas(64) T t[64 / sizeof(T)];
      _mm512_store_si512(reinterpret_cast<void*>(t), table);
      lookup(packed, t, i, end, out);
    }
  }
}

// fp32 output on AVX2 CPUs (their default precision): the block's 16 products in two registers,
// each lookup two vpermps (8 entries each) and a blend on index >= 8; 8 values per step.
__attribute__((target("avx2"))) void dequantize_blocks_avx2(const uint8_t* packed, const Absmax& absmax,
                                                            const float* code, int64_t n, int64_t blocksize,
                                                            float* out, int64_t b0, int64_t b1) {
  const __m256 code_lo = _mm256_loadu_ps(code), code_hi = _mm256_loadu_ps(code + 8);
  const __m256i low4 = _mm256_set1_epi64x(0xF), seven = _mm256_set1_epi32(7);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    const int64_t end = std::min(start + blocksize, n);
    const __m256 s = _mm256_set1_ps(absmax(b));
    const __m256 t_lo = _mm256_mul_ps(code_lo, s), t_hi = _mm256_mul_ps(code_hi, s);
    int64_t i = start;
    for (; i + 8 <= end; i += 8) {  // 4 bytes -> 4 qwords -> 8 dword indices [hi0, lo0, hi1, lo1, ...]
      int32_t word;
      std::memcpy(&word, packed + i / 2, 4);
      const __m256i q = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(word));
      const __m256i idx = _mm256_or_si256(_mm256_srli_epi64(q, 4), _mm256_slli_epi64(_mm256_and_si256(q, low4), 32));
      const __m256 lo = _mm256_permutevar8x32_ps(t_lo, idx), hi = _mm256_permutevar8x32_ps(t_hi, idx);
      const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
      _mm256_storeu_ps(out + i, _mm256_blendv_ps(lo, hi, upper));
    }
    if (i < end) {
      alignas(32) float t[16];
      _mm256_store_ps(t, t_lo);
      _mm256_store_ps(t + 8, t_hi);
      lookup(packed, t, i, end, out);
    }
  }
}
#endif

// Runs of blocks as the unit of work of every path; the OpenMP region stays in this plain function
// and the intrinsics in the target-attributed ones it calls.
template <typename F>
void over_runs(int64_t n, int64_t blocksize, F&& blocks) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  const int64_t run = std::max<int64_t>(1, 4096 / blocksize);
  const int64_t n_runs = (n_blocks + run - 1) / run;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t r = 0; r < n_runs; ++r) blocks(r * run, std::min(n_blocks, (r + 1) * run));
}

template <typename T>
void dequantize_dispatch(const uint8_t* packed, const Absmax& absmax, const float* code, int64_t n, int64_t blocksize,
                         T* out) {
#ifdef LE_NF4_X86
  constexpr bool simd = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
  if constexpr (simd) {
    const Simd level = simd_level();
    if (level == Simd::kAvx512) {
      over_runs(n, blocksize, [&](int64_t b0, int64_t b1) {
        dequantize_blocks_avx512<T>(packed, absmax, code, n, blocksize, out, b0, b1);
      });
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (level == Simd::kAvx2) {
        over_runs(n, blocksize, [&](int64_t b0, int64_t b1) {
          dequantize_blocks_avx2(packed, absmax, code, n, blocksize, out, b0, b1);
        });
        return;
      }
    }
  }
#endif
  over_runs(n, blocksize, [&](int64_t b0, int64_t b1) {
    dequantize_blocks_scalar<T>(packed, absmax, code, n, blocksize, out, b0, b1);
  });
}

at::Tensor nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                          int64_t blocksize, int64_t numel, at::ScalarType dtype,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                          double nested_offset, int64_t nested_blocksize) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte,
              "lora_engine::nf4_dequantize: packed must be a uint8 CPU tensor");
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "lora_engine::nf4_dequantize: packed has ", packed.numel(),
              " bytes, ", numel, " values need ", (numel + 1) / 2);
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0, "lora_engine::nf4_dequantize: blocksize must be even");
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK(absmax.scalar_type() == (nested ? at::kByte : at::kFloat) && absmax.numel() == n_blocks,
              "lora_engine::nf4_dequantize: absmax must be ", nested ? "uint8" : "float32", " with ", n_blocks,
              " values (one per block of ", blocksize, "), got ", absmax.scalar_type(), " with ", absmax.numel());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == kCodeSize,
              "lora_engine::nf4_dequantize: code must be float32 (16,)");
  at::Tensor n_abs, n_code;
  Absmax am{nullptr, nullptr, nullptr, nullptr, 1, 0.0f};
  auto ac = absmax.contiguous();
  if (nested) {
    TORCH_CHECK(nested_code.has_value() && nested_blocksize > 0, "lora_engine::nf4_dequantize: nested_code missing");
    n_abs = nested_absmax->contiguous();
    n_code = nested_code->contiguous();
    TORCH_CHECK(n_abs.scalar_type() == at::kFloat &&
                    n_abs.numel() == (n_blocks + nested_blocksize - 1) / nested_blocksize,
                "lora_engine::nf4_dequantize: nested_absmax must be float32 with one value per ", nested_blocksize,
                " blocks");
    TORCH_CHECK(n_code.scalar_type() == at::kFloat && n_code.numel() == 256,
                "lora_engine::nf4_dequantize: nested_code must be float32 (256,)");
    am = Absmax{nullptr, ac.data_ptr<uint8_t>(), n_code.data_ptr<float>(), n_abs.data_ptr<float>(), nested_blocksize,
                static_cast<float>(nested_offset)};
  } else {
    am.fp32 = ac.data_ptr<float>();
  }
  auto pc = packed.contiguous();
  auto cc = code.contiguous();
  auto out = at::empty({numel}, packed.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize", [&] {
    dequantize_dispatch<scalar_t>(pc.data_ptr<uint8_t>(), am, cc.data_ptr<float>(), numel, blocksize,
                                  out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lora_engine, m) {
  m.def("nf4_quantize(Tensor w, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, Tensor code, int blocksize, int numel, ScalarType dtype, "
        "Tensor? nested_absmax=None, Tensor? nested_code=None, float nested_offset=0.0, int nested_blocksize=256)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_engine, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize);
  m.impl("nf4_dequantize", &nf4_dequantize);
}

// Importing lora_engine._C registers the ops above; the module itself exposes nothing else.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "lora_engine C++ ops: torch.ops.lora_engine.*"; }
