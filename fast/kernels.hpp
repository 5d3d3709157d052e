// Host entry points to each CUDA layer of the fast trainer, for the GPU tests: they run the very launchers the
// engine runs (the .cuh files), on host vectors. bf16 inputs are passed as floats that must be bf16 values
// (they are converted exactly); bf16 outputs come back as floats. Every output is filled with NaN on the device
// before the kernel runs, so an element a kernel forgets to write shows as NaN. Plain C++, no CUDA types.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/nf4_weight.hpp"

namespace gemma::fast::kernels {

// x (N, D) fp32 = E[ids] * normalizer; E (V, D) bf16 values.
std::vector<float> embed(const std::vector<int32_t>& ids, const std::vector<float>& E, int64_t D, float normalizer);

struct Norm {
  std::vector<float> out, rstd;
};
// Input norms: x (N, D) fp32 -> out bf16 values.
Norm rmsnorm_input(int64_t N, int64_t D, const std::vector<float>& x, const std::vector<float>& w, double eps);
// Post norms: x (N, D) bf16 values -> out = res + norm(x), fp32.
Norm rmsnorm_post(int64_t N, int64_t D, const std::vector<float>& x, const std::vector<float>& w,
                  const std::vector<float>& res, double eps);

enum class NormKind {
  post,   // dout bf16, x bf16 -> dx bf16
  input,  // dout fp32 (rounded to bf16 on read), x fp32 -> dx = bf16(dres + bf16(.))
  final,  // dout bf16, x fp32 -> dx bf16
};
struct NormGrad {
  std::vector<float> dx, dw;  // dw (D) = sum over rows of dout * xhat
};
NormGrad rmsnorm_backward(NormKind kind, int64_t N, int64_t D, const std::vector<float>& dout,
                          const std::vector<float>& x, const std::vector<float>& rstd, const std::vector<float>& w,
                          const std::vector<float>& dres);

// x (N, heads*hd) bf16 values, row n at position n % T -> bf16 values.
std::vector<float> rope_forward(int64_t N, int64_t T, int64_t heads, int64_t hd, double theta,
                                const std::vector<float>& x);
// dx (N, heads*hd) fp32 -> bf16 values.
std::vector<float> rope_backward(int64_t N, int64_t T, int64_t heads, int64_t hd, double theta,
                                 const std::vector<float>& dx);

struct AttnShape {
  int64_t B = 0, T = 0, H = 0, KV = 0, hd = 0;
  double scale = 1;
  bool cap_on = false;
  double cap = 50;
  int64_t window = 0;  // 0: global layer; else a sliding layer of W keys
  std::vector<int32_t> doc;     // (B*T) document of each token (packed rows); empty: one per sequence
  std::vector<uint8_t> key_ok;  // (B*T) 0 for padding tokens; empty: none
};
struct Attention {
  std::vector<float> out;         // (N, H*hd) bf16 values
  std::vector<float> o32;         // (N, H*hd) the fp32 sum before rounding
  std::vector<float> dq, dk, dv;  // fp32, before the RoPE backward
  // out and o32 again from a second forward given the first one's m and l (AttnParams::stats_in), as the
  // engine's recomputation runs it.
  std::vector<float> out_recomputed, o32_recomputed;
};
// q (N, H*hd), k, v (N, KV*hd), dout (N, H*hd): bf16 values. mma_only: attention.cuh's kernels even where the
// Hopper ones (attention_sm90.cuh) apply.
Attention attention(const AttnShape& s, const std::vector<float>& q, const std::vector<float>& k,
                    const std::vector<float>& v, const std::vector<float>& dout, bool mma_only = false);

// Device time of the attention forward (attention_forward), backward (attention_backward, rowdot included) and
// recomputed forward (attention_forward with stats_in: the same pass, the saved statistics left as they are) on
// the engine's fused q|k|v layout, inputs drawn on the device (q, k, v uniform in [-1, 1], dout in [-0.01, 0.01]):
// the median over `iters` runs after one warm-up, in milliseconds (CUDA events).
struct AttnTiming {
  double forward_ms = 0, backward_ms = 0;
  double recomputed_forward_ms = 0;  // the forward given its own saved m and l (AttnParams::stats_in)
};
AttnTiming time_attention(const AttnShape& s, int iters, bool mma_only);
// TFLOP/s of one cuBLAS bf16 product (n x n x n, fp32 accumulation, bf16 result) on random inputs, median of
// `iters`: the ceiling the attention's rate is read against.
double gemm_tflops(int64_t n, int iters);

// gate_up (N, 2I) bf16 values -> act (N, I) bf16 values.
std::vector<float> geglu_forward(int64_t N, int64_t I, const std::vector<float>& gate_up);
// dact (N, I) fp32 (rounded on read) -> dgate_up (N, 2I) bf16 values.
std::vector<float> geglu_backward(int64_t N, int64_t I, const std::vector<float>& dact,
                                  const std::vector<float>& gate_up);

struct Loss {
  std::vector<float> row_loss;  // (N)
  std::vector<float> dxf;       // (N, D) bf16 values
  std::map<int64_t, std::vector<float>> capped;
};
// xf (N, D) and E (V, D) bf16 values; the vocabulary is padded to a multiple of 128 inside, with nonzero rows.
Loss loss(int64_t N, int64_t D, int64_t V, const std::vector<float>& xf, const std::vector<float>& E,
          const std::vector<int32_t>& targets, bool cap_on, double cap, double grad_scale, int64_t chunk_rows,
          const std::vector<int64_t>& capped_rows);

struct LoraProj {
  int64_t out = 0;
  std::vector<float> W;  // (out, in) bf16 values
  std::vector<float> A;  // (r, in) fp32; empty: no adapter on this projection
  std::vector<float> B;  // (out, r) fp32
};
struct LoraGroup {
  std::vector<float> y;               // (N, sum of outs) bf16 values
  std::vector<float> dx;              // (N, in) fp32 product sum (the caller rounds it, as the engine's consumers do)
  std::vector<std::vector<float>> dA, dB;  // per projection with an adapter
};
// Projections sharing the input x (N, in): forward, then backward of dy (N, sum of outs) bf16 values.
LoraGroup lora_group(int64_t N, int64_t in, int64_t r, double scaling, const std::vector<LoraProj>& projs,
                     const std::vector<float>& x, const std::vector<float>& dy);

// The fused kernel lora_out_add runs for one adapter of rank r on an (N, out) block whose split rows are ldl apart
// (lora_out_plan on the current device, with aligned L and B), and its row tiles: "<kernel> tiles <row tiles>
// iters <per block>", or "unfused".
std::string lora_out_kernel(int64_t r, int64_t N, int64_t out, int64_t ldl);
// Whether the current device takes the sm_90a (wgmma) kernels: built for sm_90a and compute capability 9.0.
bool hopper_kernels();
// Launches one thread that waits (tma.cuh's mbar_wait) on a barrier nothing arrives on and returns the name of
// the error the launch ends with: "cudaErrorLaunchFailure" once the wait's bound (kMbarTimeoutNs, 4 s) traps. The
// trap leaves the process's CUDA context unusable: call it in a process of its own.
std::string stuck_barrier_wait();
// The current device's multiprocessors.
int multiprocessors();

// One AdamW step t (1-based) on p with gradient g and moments m, v (updated in place).
void adamw(std::vector<float>& p, const std::vector<float>& g, std::vector<float>& m, std::vector<float>& v, int64_t t,
           double lr, double beta1, double beta2, double eps, double weight_decay);

// The device synthetic generator (synthetic.cuh): n bf16 bit patterns.
std::vector<uint16_t> synthetic_bf16(uint64_t key, double half_width, int64_t n);

// NF4 (nf4.cuh). The device quantizer of a bf16 weight x (bf16 bit patterns, `shape`), finished on the host as the
// engine finishes its synthetic weights (double quantization of the absmax).
Nf4Weight nf4_quantize(const std::vector<uint16_t>& x, const Shape& shape, int64_t blocksize, bool double_quant);
// The engine's staging: q dequantized on the device, as bf16 bit patterns; `generic`: the one-byte-a-thread kernel
// instead of the 16-value one the engine uses wherever the shape allows.
std::vector<uint16_t> nf4_dequantize(const Nf4Weight& q, bool generic = false);
// The engine's load check: how many of w (bf16 bit patterns) differ from q's dequantization.
uint64_t nf4_mismatches(const Nf4Weight& q, const std::vector<uint16_t>& w);
// The engine's other load check: how many block absmax the device decodes differently from `want` (float32).
uint64_t nf4_absmax_mismatches(const Nf4Weight& q, const std::vector<float>& want);

// Allocates `bytes` on the device and frees them: throws OutOfMemory when the device has not got them.
void allocate(size_t bytes);

}  // namespace gemma::fast::kernels
