// Fused elementwise ops of the decoder on the CPU: RMSNorm, RoPE and SwiGLU, forward and backward,
// the attention softmax and the cross-entropy gradient,
// registered as torch ops lora_engine::*_cpu (autograd and the Python side: kernels/ops_cpp.py;
// the oracle: kernels/ops_reference.py). fp32 and bf16 tensors; bf16 is widened to fp32 on load, all
// math is fp32, one rounding (to nearest even) on store. One pass over memory per op, where the
// reference's eager ops make one pass (and one bf16 <-> fp32 round trip) per elementwise step.
//
// Versions:
//   rms_norm_fwd_cpu  a row per iteration: sum of squares (fp32, in fixed_order_sum's order), rstd =
//                     1 / sqrt(mean + eps), y = w * round_T(x * rstd) (LlamaRMSNorm's order: the
//                     normalised row is rounded to x's dtype before the weight multiplies it).
//                     Returns y and the fp32 rstd (rows,).
//   rms_norm_bwd_cpu  per row: c = mean(dn * n) with dn = gy * w, n = x * rstd, dx = rstd * (dn - n * c);
//                     dw = sum over rows of gy * n, one fp32 partial row per task, summed at the end.
//   rope_cpu          per (b, h, t) row of head_dim: o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2 (forward)
//                     or its transpose d1 = g1 c1 + g2 s2, d2 = g2 c2 - g1 s1 (backward); any strides
//                     but a contiguous last dimension; outputs keep the inputs' layouts.
//   swiglu_fwd_cpu    y = g * sigmoid(g) * u over the flat tensors.
//   swiglu_bwd_cpu    s = sigmoid(g) recomputed: dg = dy u s (1 + g (1 - s)), du = dy g s.
//   ce_grad_cpu       a (rows, vocab) block of logits becomes softmax - onehot(label) in place; returns
//                     each row's loss lse - x[label] (fp32).
// Threads: at::parallel_for over rows (elements for SwiGLU), tasks of >= ~32k elements.
// Vectors: the inner loops are plain loops over one row that GCC vectorises; on x86-64 Linux each
// hot loop is compiled for x86-64-v4 (AVX-512 F, BW, CD, DQ, VL), AVX2 and the baseline (function
// multiversioning, target_clones) and the loader picks the widest the CPU has, so the build stays
// portable (never -march=native). v4, not "avx512f" alone: packing fp32 lanes to bf16 words at 512
// bits needs AVX512BW (vpackusdw on zmm); with F alone GCC vectorised every bf16 loop at 256 bits.
// sigmoid uses the Cephes exp polynomial (max error ~2 ulp fp32), vectorisable where std::exp is a
// library call.
// Build: setup.py compiles csrc/*.cpp into lora_engine.kernels._C. Check: pytest
// tests/test_ops_cpp.py.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11
#define LE_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// GCC 10 and older know no x86-64-v4: AVX-512F clones, whose bf16 loops stay at 256 bits.
#define LE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LE_CLONES
#endif

namespace {

constexpr int64_t kTaskElements = 1 << 15;

// ---- loads and stores: T -> fp32 -> T, inlined into every clone -----------------------------------
// Branch-free bit operations, so that GCC vectorises the loops that use them (with
// -fno-trapping-math, set in setup.py: without it no float select is if-converted).
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(p[i].x) << 16);
}
// fp32 -> bf16 bits, rounded to nearest even; a NaN stays a (quiet) NaN, as c10::BFloat16 does.
inline uint16_t bf16_bits(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (v != v) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(c10::BFloat16* p, int64_t i, float v) { p[i].x = bf16_bits(v); }
// The value v takes when stored as T and read back.
inline float round_to(const float*, float v) { return v; }
inline float round_to(const c10::BFloat16*, float v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(bf16_bits(v)) << 16);
}

// exp(x) (Cephes expf): x clamped to [lo, hi] = [-87.34, 88.38], x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by a degree-6 polynomial, times 2^n built from the exponent bits. Below -87.3 it returns
// ~2^-126 instead of a smaller number or 0: harmless for sigmoid, which only adds it to 1.
// The bounds come in as run-time arguments (ExpRange, passed by the callers of the clones): with
// constants GCC threads the loop through each clamp's constant outcome and computes the body
// three times over (measured: 2.7 ns against 0.95 ns a bf16 element for SwiGLU's forward).
struct ExpRange {
  float lo, hi;
};
constexpr ExpRange kExpRange{-87.3365478515625f, 88.3762626647949f};

inline float exp_approx(float x, ExpRange b) {
  x = x < b.hi ? x : b.hi;
  x = x > b.lo ? x : b.lo;  // a NaN becomes hi here; the callers multiply by g, so NaN comes out
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

inline float sigmoid(float g, ExpRange b) { return 1.0f / (1.0f + exp_approx(-g, b)); }

// fn(float{}) or fn(c10::BFloat16{}): the two dtypes these ops take (the callers checked which).
template <typename F>
void dispatch_fp32_bf16(at::ScalarType st, F&& fn) {
  if (st == at::kBFloat16) {
    fn(c10::BFloat16{});
  } else {
    fn(float{});
  }
}

int64_t grain(int64_t width) { return std::max<int64_t>(1, kTaskElements / std::max<int64_t>(width, 1)); }

void check_cpu_float(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lora_engine::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "lora_engine::", op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "lora_engine::", op, ": ", name, " is ", t.scalar_type(), " but ",
              like_name, " is ", like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), "lora_engine::", op, ": ", name, " has shape ", t.sizes(), " but ", like_name,
              " has ", like.sizes());
}

// ---- sums in one fixed order ---------------------------------------------------------------------
// An omp simd reduction leaves the order of a sum to the vector width GCC picks for the loop, and
// that differs between the AVX-512 and the AVX2 clone, and between a bf16 and an fp32 load of the
// same values (on an AVX2 CPU a bf16 softmax row summed its exps in another order than the same row
// in fp32: lse differed in the last bit). Here term j always goes to partial sum j % 16 and the 16
// partials are added pairwise (l + 8, + 4, + 2, + 1): the same bits on every CPU and for every input
// dtype, and still one or two vectors of accumulators for GCC.
constexpr int kLanes = 16;
template <typename F>
__attribute__((always_inline)) inline float fixed_order_sum(int64_t n, F term) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += term(j + l);
  }
  for (int l = 0; j < n; ++j, ++l) acc[l] += term(j);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// ---- RMSNorm -------------------------------------------------------------------------------------
template <typename T>
LE_CLONES void rms_fwd_row(const T* x, const T* w, T* y, float* rstd, int64_t d, float eps) {
  const float ss = fixed_order_sum(d, [&](int64_t j) __attribute__((always_inline)) {
    const float v = load(x, j);
    return v * v;
  });
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
  *rstd = r;
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) store(y, j, load(w, j) * round_to(x, load(x, j) * r));
}

template <typename T>
LE_CLONES void rms_bwd_row(const T* gy, const T* x, const T* w, float r, T* dx, float* dw, int64_t d) {
  // The reference's order of operations (n = x * rstd, dn = gy * w, c = mean(dn * n)), so that
  // where dn - n * c cancels (a row of one element, dx ~ 0) both round alike.
  const float dot = fixed_order_sum(d, [&](int64_t j) __attribute__((always_inline)) {
    return (load(gy, j) * load(w, j)) * (load(x, j) * r);
  });
  const float c = dot / static_cast<float>(d);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    const float n = load(x, j) * r;
    store(dx, j, r * (load(gy, j) * load(w, j) - n * c));
  }
  if (dw) {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) dw[j] += load(gy, j) * (load(x, j) * r);
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cpu_float("rms_norm_fwd_cpu", x, "x");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "lora_engine::rms_norm_fwd_cpu: weight must be (", x.dim() ? x.size(-1) : 0, ",), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "lora_engine::rms_norm_fwd_cpu: weight is ",
              weight.scalar_type(), " but x is ", x.scalar_type());
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  auto y = at::empty_like(xc);
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  dispatch_fp32_bf16(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    float* rp = rstd.data_ptr<float>();
    at::parallel_for(0, rows, grain(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) rms_fwd_row(xp + i * d, wp, yp + i * d, rp + i, d, static_cast<float>(eps));
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& rstd, bool need_dw) {
  check_cpu_float("rms_norm_bwd_cpu", x, "x");
  check_like("rms_norm_bwd_cpu", gy, "gy", x, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "lora_engine::rms_norm_bwd_cpu: weight must be (", x.size(-1), ",) ", x.scalar_type(), ", got ",
              weight.sizes(), " ", weight.scalar_type());
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows,
              "lora_engine::rms_norm_bwd_cpu: rstd must be float32 with one value per row (", rows, "), got ",
              rstd.scalar_type(), " with ", rstd.numel());
  auto gc = gy.contiguous(), xc = x.contiguous(), wc = weight.contiguous(), rc = rstd.contiguous();
  auto dx = at::empty_like(xc);
  // dw: one fp32 partial row per task (tasks are fixed up front, so no thread ids are needed).
  const int64_t g = grain(d);
  const int64_t tasks = need_dw ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + g - 1) / g)) : 0;
  auto partial = at::zeros({std::max<int64_t>(tasks, 1), d}, x.options().dtype(at::kFloat));
  dispatch_fp32_bf16(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    const float* rp = rc.data_ptr<float>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    float* pp = partial.data_ptr<float>();
    auto rows_of = [&](int64_t begin, int64_t end, float* dw) {
      for (int64_t i = begin; i < end; ++i) rms_bwd_row(gp + i * d, xp + i * d, wp, rp[i], dxp + i * d, dw, d);
    };
    if (!need_dw) {
      at::parallel_for(0, rows, g, [&](int64_t b, int64_t e) { rows_of(b, e, nullptr); });
    } else {
      const int64_t per = (rows + tasks - 1) / tasks;
      at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) rows_of(t * per, std::min(rows, (t + 1) * per), pp + t * d);
      });
    }
  });
  at::Tensor dw = need_dw ? partial.sum(0).to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {dx, dw};
}

// ---- RoPE ----------------------------------------------------------------------------------------
template <typename T>
LE_CLONES void rope_row(const T* in, T* out, const T* c, const T* s, int64_t half, bool backward) {
  if (backward) {
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = load(in, j), x2 = load(in, j + half);
      store(out, j, x1 * load(c, j) + x2 * load(s, j + half));
      store(out, j + half, x2 * load(c, j + half) - x1 * load(s, j));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = load(in, j), x2 = load(in, j + half);
      store(out, j, x1 * load(c, j) - x2 * load(s, j));
      store(out, j + half, x2 * load(c, j + half) + x1 * load(s, j + half));
    }
  }
}

// x (B, H, T, hd) with stride(-1) == 1; cos/sin (B or 1, T, hd) contiguous.
template <typename T>
void rope_tensor(const at::Tensor& x, at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const int64_t B = x.size(0), H = x.size(1), Tn = x.size(2), hd = x.size(3), half = hd / 2;
  const int64_t cb = cos.size(0) == 1 ? 0 : Tn * hd;  // cos's batch stride: 0 when broadcast
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const auto xs = x.strides(), os = out.strides();
  at::parallel_for(0, B * H * Tn, grain(hd), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i % Tn, h = (i / Tn) % H, b = i / (Tn * H);
      const int64_t ct = b * cb + t * hd;
      rope_row(xp + b * xs[0] + h * xs[1] + t * xs[2], op + b * os[0] + h * os[1] + t * os[2], cp + ct, sp + ct, half,
               backward);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool backward) {
  check_cpu_float("rope_cpu", q, "q");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "lora_engine::rope_cpu: q and k must be (B, H, T, head_dim), got ",
              q.sizes(), " and ", k.sizes());
  const int64_t B = q.size(0), Tn = q.size(2), hd = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == Tn && k.size(3) == hd, "lora_engine::rope_cpu: k ", k.sizes(),
              " does not match q ", q.sizes(), " in batch, length or head_dim");
  TORCH_CHECK(hd % 2 == 0, "lora_engine::rope_cpu: head_dim must be even, got ", hd);
  TORCH_CHECK(cos.dim() == 3 && (cos.size(0) == B || cos.size(0) == 1) && cos.size(1) == Tn && cos.size(2) == hd &&
                  sin.sizes() == cos.sizes(),
              "lora_engine::rope_cpu: cos and sin must be (", B, " or 1, ", Tn, ", ", hd, "), got ", cos.sizes(),
              " and ", sin.sizes());
  for (const auto* t : {&k, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "lora_engine::rope_cpu: q, k, cos and sin must share one dtype on the CPU; q is ", q.scalar_type(),
                ", got ", t->scalar_type(), " on ", t->device());
  auto qc = q.stride(3) == 1 ? q : q.contiguous();
  auto kc = k.stride(3) == 1 ? k : k.contiguous();
  auto cc = cos.contiguous(), sc = sin.contiguous();
  auto qo = at::empty_like(qc), ko = at::empty_like(kc);
  dispatch_fp32_bf16(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rope_tensor<scalar_t>(qc, qo, cc, sc, backward);
    rope_tensor<scalar_t>(kc, ko, cc, sc, backward);
  });
  return {qo, ko};
}

// ---- SwiGLU --------------------------------------------------------------------------------------
template <typename T>
LE_CLONES void swiglu_fwd_span(const T* g, const T* u, T* y, int64_t n, ExpRange b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gv = load(g, i);
    store(y, i, gv * sigmoid(gv, b) * load(u, i));
  }
}

template <typename T>
LE_CLONES void swiglu_bwd_span(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n, ExpRange b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gv = load(g, i), uv = load(u, i), d = load(dy, i);
    const float s = sigmoid(gv, b);
    store(dg, i, d * uv * (s * (1.0f + gv * (1.0f - s))));
    store(du, i, d * (gv * s));
  }
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_cpu_float("swiglu_fwd_cpu", gate, "gate");
  check_like("swiglu_fwd_cpu", up, "up", gate, "gate");
  auto gc = gate.contiguous(), uc = up.contiguous();
  auto y = at::empty_like(gc);
  const int64_t n = gc.numel();
  dispatch_fp32_bf16(gate.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* up_ = uc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n, kTaskElements, [&](int64_t b, int64_t e) {
      swiglu_fwd_span(gp + b, up_ + b, yp + b, e - b, kExpRange);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  check_cpu_float("swiglu_bwd_cpu", gate, "gate");
  check_like("swiglu_bwd_cpu", up, "up", gate, "gate");
  check_like("swiglu_bwd_cpu", dy, "dy", gate, "gate");
  auto dc = dy.contiguous(), gc = gate.contiguous(), uc = up.contiguous();
  auto dg = at::empty_like(gc), du = at::empty_like(uc);
  const int64_t n = gc.numel();
  dispatch_fp32_bf16(gate.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* dp = dc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* up_ = uc.data_ptr<scalar_t>();
    scalar_t* dgp = dg.data_ptr<scalar_t>();
    scalar_t* dup = du.data_ptr<scalar_t>();
    at::parallel_for(0, n, kTaskElements, [&](int64_t b, int64_t e) {
      swiglu_bwd_span(dp + b, gp + b, up_ + b, dgp + b, dup + b, e - b, kExpRange);
    });
  });
  return {dg, du};
}

// ---- attention: the softmax of a block of scores, and its gradient ------------------------------
// s (R, n): raw scores q.k of R query rows against n keys, fp32 or (bf16 attention) bf16, read
// as fp32 (kernels/attention_cpp.py makes them with one GEMM per chunk of queries). Row r is the
// query at position start + r % period; causal: it sees keys 0..position, the rest of its row gets
// 0. x = s * scale; forward: lse = m + log(sum exp(x - m)), m the row's max, and p = exp(x - m) / sum
// stored as T; backward, with dp (R, n) = dO.V (s's dtype) and delta = rowsum(dO * O) (fp32): p
// again, and ds = p (dp - delta) scale as T. All arithmetic in fp32.
inline int64_t visible(int64_t r, int64_t n, int64_t start, int64_t period, bool causal) {
  return causal ? std::min<int64_t>(n, start + r % period + 1) : n;
}

// e (lim floats): the row's exp(x - m), kept so that exp runs once a value; p = e / sum, which
// backward's exp(x - lse) reproduces to within an fp32 rounding or two (both rounded to T).
template <typename S, typename T>
LE_CLONES void softmax_row(const S* s, T* p, float* lse, float* e, int64_t n, int64_t lim, float scale, ExpRange b) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < lim; ++j) m = std::max(m, load(s, j) * scale);
#pragma omp simd
  for (int64_t j = 0; j < lim; ++j) e[j] = exp_approx(load(s, j) * scale - m, b);
  const float sum = fixed_order_sum(lim, [&](int64_t j) __attribute__((always_inline)) { return e[j]; });
  *lse = m + std::log(sum);
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < lim; ++j) store(p, j, e[j] * inv);
  for (int64_t j = lim; j < n; ++j) store(p, j, 0.0f);
}

template <typename S, typename T>
LE_CLONES void softmax_bwd_row(const S* s, const S* dp, float lse, float delta, T* p, T* ds, int64_t n,
                               int64_t lim, float scale, ExpRange b) {
#pragma omp simd
  for (int64_t j = 0; j < lim; ++j) {
    const float pj = exp_approx(load(s, j) * scale - lse, b);
    store(p, j, pj);
    store(ds, j, pj * (load(dp, j) - delta) * scale);
  }
  for (int64_t j = lim; j < n; ++j) {
    store(p, j, 0.0f);
    store(ds, j, 0.0f);
  }
}

void check_scores(const char* op, const at::Tensor& t, const char* name, int64_t period, at::ScalarType out) {
  TORCH_CHECK(out == at::kFloat || out == at::kBFloat16, "lora_engine::", op, ": out_dtype must be float32 or bfloat16");
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == out) && t.dim() >= 1,
              "lora_engine::", op, ": ", name, " must be a float32 CPU tensor or one of out_dtype ", out, ", got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(period >= 1, "lora_engine::", op, ": period must be >= 1, got ", period);
}

std::tuple<at::Tensor, at::Tensor> attn_softmax_fwd_cpu(const at::Tensor& s, double scale, int64_t start,
                                                        int64_t period, bool causal, at::ScalarType out_dtype) {
  check_scores("attn_softmax_fwd_cpu", s, "s", period, out_dtype);
  auto sc = s.contiguous();
  const int64_t n = s.size(-1), rows = n ? s.numel() / n : 0;
  auto p = at::empty(s.sizes(), s.options().dtype(out_dtype));
  auto lse = at::empty({rows}, s.options().dtype(at::kFloat));
  dispatch_fp32_bf16(s.scalar_type(), [&](auto in_tag) {
    dispatch_fp32_bf16(out_dtype, [&](auto tag) {
      using in_t = decltype(in_tag);
      using scalar_t = decltype(tag);
      const in_t* sp = sc.data_ptr<in_t>();
      scalar_t* pp = p.data_ptr<scalar_t>();
      float* lp = lse.data_ptr<float>();
      at::parallel_for(0, rows, grain(n), [&](int64_t b, int64_t e) {
        std::vector<float> ex(static_cast<size_t>(n));
        for (int64_t r = b; r < e; ++r)
          softmax_row(sp + r * n, pp + r * n, lp + r, ex.data(), n, visible(r, n, start, period, causal),
                      static_cast<float>(scale), kExpRange);
      });
    });
  });
  return {p, lse};
}

std::tuple<at::Tensor, at::Tensor> attn_softmax_bwd_cpu(const at::Tensor& s, const at::Tensor& dp, const at::Tensor& lse,
                                                        const at::Tensor& delta, double scale, int64_t start,
                                                        int64_t period, bool causal, at::ScalarType out_dtype) {
  check_scores("attn_softmax_bwd_cpu", s, "s", period, out_dtype);
  check_like("attn_softmax_bwd_cpu", dp, "dp", s, "s");
  const int64_t n = s.size(-1), rows = n ? s.numel() / n : 0;
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == rows && delta.scalar_type() == at::kFloat &&
                  delta.numel() == rows,
              "lora_engine::attn_softmax_bwd_cpu: lse and delta must be float32 with one value per row (", rows, ")");
  auto sc = s.contiguous(), dc = dp.contiguous(), lc = lse.contiguous(), ec = delta.contiguous();
  auto p = at::empty(s.sizes(), s.options().dtype(out_dtype));
  auto ds = at::empty(s.sizes(), s.options().dtype(out_dtype));
  dispatch_fp32_bf16(s.scalar_type(), [&](auto in_tag) {
    dispatch_fp32_bf16(out_dtype, [&](auto tag) {
      using in_t = decltype(in_tag);
      using scalar_t = decltype(tag);
      const in_t* sp = sc.data_ptr<in_t>();
      const in_t* dpp = dc.data_ptr<in_t>();
      const float* lp = lc.data_ptr<float>();
      const float* ep = ec.data_ptr<float>();
      scalar_t* pp = p.data_ptr<scalar_t>();
      scalar_t* dsp = ds.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain(n), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          softmax_bwd_row(sp + r * n, dpp + r * n, lp[r], ep[r], pp + r * n, dsp + r * n, n,
                          visible(r, n, start, period, causal), static_cast<float>(scale), kExpRange);
      });
    });
  });
  return {p, ds};
}

// ---- cross-entropy: a block of logits becomes softmax minus one-hot, in place ---------------------
// logits (R, V), fp32 or bf16, contiguous; labels (R,) int64 in [0, V). Per row, in fp32: m the max,
// lse = m + log(sum exp(x - m)) (fixed_order_sum), loss = lse - x[label]; the row is overwritten by
// exp(x - lse) - [j == label], rounded once to its dtype: the gradient of the row's loss with respect
// to its logits, which the caller multiplies by the head weight for dh
// (kernels/ops_cpp.py: linear_cross_entropy). Returns the per-row losses (R,) fp32. One read of the
// row for its max, one for the sum, one read and write for the gradient: a 49152-wide row is 96 kB
// in bf16 and stays in L2, so memory sees the block about once, where the reference's eager ops make
// seven fp32 passes over it.
template <typename T>
LE_CLONES void ce_grad_row(T* x, int64_t label, float* loss, int64_t n, ExpRange b) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, load(x, j));
  const float sum = fixed_order_sum(n, [&](int64_t j) __attribute__((always_inline)) {
    return exp_approx(load(x, j) - m, b);
  });
  const float l = m + std::log(sum);
  const float target = load(x, label);
  *loss = l - target;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) store(x, j, exp_approx(load(x, j) - l, b));
  store(x, label, exp_approx(target - l, b) - 1.0f);  // from the fp32 target: one rounding
}

at::Tensor ce_grad_cpu(at::Tensor logits, const at::Tensor& labels) {
  check_cpu_float("ce_grad_cpu", logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "lora_engine::ce_grad_cpu: logits must be a contiguous "
              "(rows, vocab) tensor, got shape ", logits.sizes(), " strides ", logits.strides());
  const int64_t rows = logits.size(0), n = logits.size(1);
  TORCH_CHECK(labels.device().is_cpu() && labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                  labels.size(0) == rows,
              "lora_engine::ce_grad_cpu: labels must be a CPU int64 tensor of ", rows, " values, got ",
              labels.scalar_type(), " ", labels.sizes(), " on ", labels.device());
  auto lab = labels.contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(lp[r] >= 0 && lp[r] < n, "lora_engine::ce_grad_cpu: label ", lp[r], " of row ", r,
                " is outside the vocabulary [0, ", n, ")");
  auto loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (n == 0) return loss;
  float* out = loss.data_ptr<float>();
  dispatch_fp32_bf16(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* xp = logits.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) ce_grad_row(xp + r * n, lp[r], out + r, n, kExpRange);
    });
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_engine, m) {
  m.def("rms_norm_fwd_cpu(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd_cpu(Tensor gy, Tensor x, Tensor weight, Tensor rstd, bool need_dw) -> (Tensor, Tensor)");
  m.def("rope_cpu(Tensor q, Tensor k, Tensor cos, Tensor sin, bool backward) -> (Tensor, Tensor)");
  m.def("swiglu_fwd_cpu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd_cpu(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("attn_softmax_fwd_cpu(Tensor s, float scale, int start, int period, bool causal, ScalarType out_dtype) -> "
        "(Tensor, Tensor)");
  m.def("attn_softmax_bwd_cpu(Tensor s, Tensor dp, Tensor lse, Tensor delta, float scale, int start, int period, "
        "bool causal, ScalarType out_dtype) -> (Tensor, Tensor)");
  m.def("ce_grad_cpu(Tensor(a!) logits, Tensor labels) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_engine, CPU, m) {
  m.impl("rms_norm_fwd_cpu", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd_cpu", &rms_norm_bwd_cpu);
  m.impl("rope_cpu", &rope_cpu);
  m.impl("swiglu_fwd_cpu", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd_cpu", &swiglu_bwd_cpu);
  m.impl("attn_softmax_fwd_cpu", &attn_softmax_fwd_cpu);
  m.impl("attn_softmax_bwd_cpu", &attn_softmax_bwd_cpu);
  m.impl("ce_grad_cpu", &ce_grad_cpu);
}
