/*
NF4 dequantization on a CUDA GPU, byte-compatible with bitsandbytes (format: kernels/nf4_format.py).

  out[i] = NF4[q[i]] * absmax[i / blocksize]        (fp32 product, one rounding to bf16/fp16/fp32)
  absmax[b] = DYN[qabsmax[b]] * absmax2[b / 256] + offset   when double-quantized (two roundings, no fma)
  q[2j] = packed[j] >> 4, q[2j+1] = packed[j] & 15

Versions:
  1) one thread per packed byte (two outputs), absmax decoded per thread: the simple baseline.
  2) one thread per 4 packed bytes (8 outputs, one 8- or 16-byte vector store), NF4 table in
     registers via __constant__ memory; the absmax of a thread's run is decoded once (a run never
     crosses a block: blocksize >= 32 values = 16 bytes, a multiple of 4 bytes).

Compile and run standalone (CPU reference, validation, then timing; llm.c dev/cuda style):
  nvcc -O3 --fmad=false -o nf4_dequant csrc/nf4_dequant.cu && ./nf4_dequant [version]
Inside the torch extension (setup.py, only when torch.cuda is available and nvcc exists) the same
kernels are registered as the CUDA implementation of lora_engine::nf4_dequantize; build with
`pip install --no-build-isolation -e .` on a CUDA machine. --fmad=false keeps every product rounded
exactly as the PyTorch reference (kernels/nf4_reference.py) does.
Status: compiled with nvcc 13.0 on a machine without a GPU; not yet run on a GPU.
*/
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

__constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct AbsmaxArgs {
  const float* fp32;     // not nested: fp32 (n_blocks,)
  const uint8_t* q;      // nested: uint8 (n_blocks,)
  const float* code2;    // nested: fp32 (256,)
  const float* absmax2;  // nested: fp32 (ceil(n_blocks / group),)
  int64_t group;
  float offset;
};

__device__ __forceinline__ float block_absmax(const AbsmaxArgs& a, int64_t b) {
  if (a.fp32 != nullptr) return a.fp32[b];
  const float scaled = __fmul_rn(a.code2[a.q[b]], a.absmax2[b / a.group]);
  return __fadd_rn(scaled, a.offset);
}

// Version 1: one thread per packed byte.
template <typename T>
__global__ void nf4_dequant_v1(const uint8_t* __restrict__ packed, AbsmaxArgs am, int64_t blocksize, int64_t n,
                               T* __restrict__ out) {
  const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;  // byte index
  const int64_t i = 2 * j;
  if (i >= n) return;
  const uint8_t byte = packed[j];
  const float s = block_absmax(am, i / blocksize);
  out[i] = from_float<T>(__fmul_rn(kNF4[byte >> 4], s));
  if (i + 1 < n) out[i + 1] = from_float<T>(__fmul_rn(kNF4[byte & 0xF], s));
}

// Version 2: one thread per 4 packed bytes (8 values); scalar tail when n is not a multiple of 8.
template <typename T>
__global__ void nf4_dequant_v2(const uint8_t* __restrict__ packed, AbsmaxArgs am, int64_t blocksize, int64_t n,
                               T* __restrict__ out) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t i0 = 8 * t;
  if (i0 >= n) return;
  const float s = block_absmax(am, i0 / blocksize);
  if (i0 + 8 <= n) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + 4 * t);  // 4-byte aligned: t * 4
    T v[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t byte = (word >> (8 * k)) & 0xFF;  // little endian: byte k of the word
      v[2 * k] = from_float<T>(__fmul_rn(kNF4[byte >> 4], s));
      v[2 * k + 1] = from_float<T>(__fmul_rn(kNF4[byte & 0xF], s));
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) out[i0 + k] = v[k];
  } else {
    for (int64_t i = i0; i < n; ++i) {
      const uint8_t byte = packed[i / 2];
      out[i] = from_float<T>(__fmul_rn(kNF4[(i % 2 == 0) ? (byte >> 4) : (byte & 0xF)], s));
    }
  }
}

template <typename T>
void launch_nf4_dequant(int version, const uint8_t* packed, AbsmaxArgs am, int64_t blocksize, int64_t n, T* out,
                        cudaStream_t stream) {
  const int threads = 256;
  if (version == 1) {
    const int64_t work = (n + 1) / 2;
    nf4_dequant_v1<T><<<(unsigned)((work + threads - 1) / threads), threads, 0, stream>>>(packed, am, blocksize, n,
                                                                                        out);
  } else {
    const int64_t work = (n + 7) / 8;
    nf4_dequant_v2<T><<<(unsigned)((work + threads - 1) / threads), threads, 0, stream>>>(packed, am, blocksize, n,
                                                                                        out);
  }
}

#ifdef LORA_ENGINE_TORCH_OP
// ---- the torch op (built into lora_engine._C by setup.py on CUDA machines) ----------------------------
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

static at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                      int64_t blocksize, int64_t numel, at::ScalarType dtype,
                                      const c10::optional<at::Tensor>& nested_absmax,
                                      const c10::optional<at::Tensor>& nested_code, double nested_offset,
                                      int64_t nested_blocksize) {
  TORCH_CHECK(packed.is_cuda() && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "lora_engine::nf4_dequantize (CUDA): packed must be a contiguous uint8 CUDA tensor");
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "lora_engine::nf4_dequantize (CUDA): packed has ", packed.numel(),
              " bytes, ", numel, " values need ", (numel + 1) / 2);
  TORCH_CHECK(blocksize >= 32 && blocksize % 8 == 0, "lora_engine::nf4_dequantize (CUDA): blocksize ", blocksize,
              " not supported (32..4096)");
  // The kernels hard-code the NF4 table; a different code would be silently ignored, so refuse it.
  TORCH_CHECK(code.numel() == 16, "lora_engine::nf4_dequantize (CUDA): code must be the 16 NF4 values");
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  AbsmaxArgs am{nullptr, nullptr, nullptr, nullptr, 1, 0.0f};
  at::Tensor ac = absmax.contiguous(), n_abs, n_code;
  TORCH_CHECK(ac.numel() == n_blocks, "lora_engine::nf4_dequantize (CUDA): absmax has ", ac.numel(), " values, ",
              n_blocks, " blocks");
  if (nested_absmax.has_value()) {
    TORCH_CHECK(nested_code.has_value() && ac.scalar_type() == at::kByte,
                "lora_engine::nf4_dequantize (CUDA): a nested absmax needs uint8 absmax and nested_code");
    n_abs = nested_absmax->contiguous();
    n_code = nested_code->contiguous();
    am = AbsmaxArgs{nullptr, ac.data_ptr<uint8_t>(), n_code.data_ptr<float>(), n_abs.data_ptr<float>(),
                    nested_blocksize, static_cast<float>(nested_offset)};
  } else {
    TORCH_CHECK(ac.scalar_type() == at::kFloat, "lora_engine::nf4_dequantize (CUDA): absmax must be float32");
    am.fp32 = ac.data_ptr<float>();
  }
  auto out = at::empty({numel}, packed.options().dtype(dtype));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const int v = reinterpret_cast<uintptr_t>(p) % 4 == 0 ? 2 : 1;  // version 2 loads 4-byte words
  if (dtype == at::kFloat) {
    launch_nf4_dequant<float>(v, p, am, blocksize, numel, out.data_ptr<float>(), stream);
  } else if (dtype == at::kHalf) {
    launch_nf4_dequant<__half>(v, p, am, blocksize, numel, reinterpret_cast<__half*>(out.data_ptr<at::Half>()),
                               stream);
  } else if (dtype == at::kBFloat16) {
    launch_nf4_dequant<__nv_bfloat16>(v, p, am, blocksize, numel,
                                      reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()), stream);
  } else {
    TORCH_CHECK(false, "lora_engine::nf4_dequantize (CUDA): dtype must be float32, float16 or bfloat16");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(lora_engine, CUDA, m) { m.impl("nf4_dequantize", &nf4_dequantize_cuda); }

#else
// ---- standalone: CPU reference, validation, timing ------------------------------------------------------
#define CUDA_CHECK(x)                                                                              \
  do {                                                                                             \
    cudaError_t e = (x);                                                                           \
    if (e != cudaSuccess) {                                                                        \
      fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__);    \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

static const float hNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

static void dequant_cpu(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    out[i] = hNF4[(i % 2 == 0) ? (byte >> 4) : (byte & 0xF)] * absmax[i / blocksize];
  }
}

int main(int argc, char** argv) {
  const int version = argc > 1 ? atoi(argv[1]) : 2;
  const int64_t n = 4096LL * 4096 + 37;  // not a multiple of the block: exercises the tail
  const int64_t blocksize = 64, n_blocks = (n + blocksize - 1) / blocksize, bytes = (n + 1) / 2;
  uint8_t* packed = (uint8_t*)malloc(bytes);
  float* absmax = (float*)malloc(n_blocks * sizeof(float));
  float* ref = (float*)malloc(n * sizeof(float));
  float* got = (float*)malloc(n * sizeof(float));
  srand(0);
  for (int64_t j = 0; j < bytes; ++j) packed[j] = (uint8_t)(rand() & 0xFF);
  for (int64_t b = 0; b < n_blocks; ++b) absmax[b] = (float)rand() / RAND_MAX * 0.1f;
  dequant_cpu(packed, absmax, blocksize, n, ref);

  uint8_t* d_packed;
  float *d_absmax, *d_out;
  CUDA_CHECK(cudaMalloc(&d_packed, bytes + 4));
  CUDA_CHECK(cudaMalloc(&d_absmax, n_blocks * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d_out, n * sizeof(float)));
  CUDA_CHECK(cudaMemcpy(d_packed, packed, bytes, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_absmax, absmax, n_blocks * sizeof(float), cudaMemcpyHostToDevice));
  AbsmaxArgs am{d_absmax, nullptr, nullptr, nullptr, 1, 0.0f};

  launch_nf4_dequant<float>(version, d_packed, am, blocksize, n, d_out, 0);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaMemcpy(got, d_out, n * sizeof(float), cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < n; ++i) {
    if (got[i] != ref[i]) {
      printf("Mismatch at %lld: %.9g vs %.9g\n", (long long)i, got[i], ref[i]);
      return 1;
    }
  }
  printf("All results match. Starting benchmarks.\n");
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  const int reps = 100;
  CUDA_CHECK(cudaEventRecord(start));
  for (int r = 0; r < reps; ++r) launch_nf4_dequant<float>(version, d_packed, am, blocksize, n, d_out, 0);
  CUDA_CHECK(cudaEventRecord(stop));
  CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  ms /= reps;
  const double moved = (double)bytes + n_blocks * 4.0 + n * 4.0;
  printf("version %d: %.4f ms, %.1f GB/s (fp32 out, %lld values)\n", version, ms, moved / ms / 1e6, (long long)n);
  cudaFree(d_packed);
  cudaFree(d_absmax);
  cudaFree(d_out);
  free(packed);
  free(absmax);
  free(ref);
  free(got);
  return 0;
}
#endif
