// QLoRA's frozen base: 4-bit NormalFloat (NF4) weights exactly as bitsandbytes quantizes, stores and
// dequantizes them, and the bitsandbytes 4-bit layout of a transformers checkpoint saved with
// BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").
//
// Every number below is bitsandbytes' own (repository bitsandbytes-foundation/bitsandbytes, commit 95f9af3 of
// 2026-08-19); docs/qlora.md has the same facts with the reasoning.
//
// Code book. 16 float32 values, csrc/kernels.cu `nf4_dequantization_lut` = functional.py
// `get_4bit_type("nf4")` (create_normal_map(offset=0.9677083, use_extra_value=True), divided by its absolute
// maximum 1.0, so unchanged). Code c (0..15) means kNF4[c].
//
// Quantize (functional.py quantize_4bit -> csrc/kernels.cu kQuantizeBlockwise / kQuantizeBlockwiseSmall, NF4),
// for the n = out * in values of a weight in row-major order, in blocks of `blocksize` (64 by default):
//   absmax_b = max |float(x_i)| over block b                 (float32, exact: a max)
//   inv_b    = 1.0f / absmax_b                               (float32, rounded; 1/0 = inf)
//   code_i   = dQuantizeNF4(float(x_i) * inv_b)              (float32 product, rounded, then a decision tree of
//                                                             strict > against 15 float32 thresholds: nf4_code)
// An all-zero block has absmax 0, 0 * inf = NaN, every comparison with NaN is false, so its codes are 0 (-1.0).
// Packing: out[j] = code_{2j} << 4 | code_{2j+1} (first element in the HIGH nibble); an odd n pads a zero
// code in the last low nibble. The packed tensor has shape [(n + 1) / 2, 1], dtype uint8.
//
// Double quantization (quantize_4bit with compress_statistics=True, QLoRA's bnb_4bit_use_double_quant):
//   offset   = mean(absmax)                                  (torch float32 mean; see nf4_offset)
//   absmax' = quantize_blockwise(absmax - offset, blocksize=256) with create_dynamic_map() (signed, 8 bits):
//   absmax2_k = max |absmax_i - offset| over nested block k  (float32)
//   acode_i  = dQuantize<0>(dynamic_map, (absmax_i - offset) * (1.0f / absmax2_k))   (binary search, nearest by
//              float32 midpoints; dynamic_code)
//
// Dequantize (functional.py dequantize_4bit -> csrc/kernels.cu kDequantizeBlockwise, NF4, `blocksize / 2`
// bytes per absmax as ops.cu's dequantizeBlockwise passes it, i.e. element i uses block i / blocksize):
//   nested:  absmax_i = float(float(nested_quant_map[acode_i] * nested_absmax[i / nested_blocksize]) + offset)
//            (dequantize_blockwise to float32, then `absmax += quant_state.offset` in float32)
//   w_i      = T(kNF4[code_i] * absmax_{i / blocksize})      (float32 product, ONE rounding to the quant state's
//                                                             dtype T: bf16 round-to-nearest-even for a bf16 model)
// bnb's matmul_4bit then casts that weight to the activations' dtype (a no-op for bf16 under bf16 compute).
#pragma once
#include <array>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "nf4_weight.hpp"

namespace gemma {

// create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 float32 values, ascending, in [-1, 1].
// Computed as torch computes it in float32 (linspace's two halves, means, the decade scale); see nf4.cpp for the
// one step whose rounding could differ from a given torch build.
const std::vector<float>& dynamic_map();
// dQuantize<0>(code, 0, x): the 8-bit code of x in a sorted 256-entry map (binary search, then the nearer
// neighbour by float32 midpoints).
uint8_t dynamic_code(const std::vector<float>& code, float x);
// torch's float32 mean of the absmax, as nearly as a CPU can say it: the float64 sum (exact for fewer than 2^29
// blocks of bf16-derived magnitudes to within one rounding) divided by n, rounded once to float32. torch's CUDA
// reduction sums in float32 in its own tree order and may differ in the last bits: our --quantize nf4 then
// equals bitsandbytes' own quantization except where that offset differs.
float nf4_offset(const std::vector<float>& absmax);

// quantize_4bit(A, blocksize, compress_statistics=double_quant, quant_type="nf4") of a float tensor (bf16, f16 or
// f32: the values bitsandbytes reads, exactly). The result's dtype is the input's, as QuantState.dtype is A.dtype.
Nf4Weight quantize_nf4(const Tensor& w, int64_t blocksize = kNF4Blocksize, bool double_quant = true);
// quantize_4bit's second half: with double quantization (compress_statistics=True) the block absmax of q
// (float32, one per block, as the first half computed them) become q's nested fields (offset, codes, nested
// absmax, nested_quant_map); without, q.absmax. The fast trainer quantizes its synthetic weights on the device
// and finishes them here, so both quantizers share this half.
void set_absmax(Nf4Weight& q, std::vector<float> absmax, bool double_quant);
// The float32 absmax per block that dequantize_4bit multiplies by (nested: decoded, offset added).
std::vector<float> nf4_absmax(const Nf4Weight& q);
// dequantize_4bit: the weight as bitsandbytes hands it to the matmul, in q.dtype (bf16, f16 or f32).
Tensor dequantize_nf4(const Nf4Weight& q);

// config.json's quantization_config as transformers' BitsAndBytesConfig writes it, for the one quantization
// implemented: bitsandbytes 4-bit NF4 with uint8 storage.
struct BnbConfig {
  bool double_quant = false;                // bnb_4bit_use_double_quant (only describes; the file's state decides)
  std::string compute_dtype;                // bnb_4bit_compute_dtype ("" when null)
  std::vector<std::string> skip_modules;    // llm_int8_skip_modules
  std::string describe() const;
};
// Reads the value of config.json's quantization_config: null gives nothing; bitsandbytes 4-bit NF4 is read;
// everything else is refused (InputError "<source>: quantization_config...: ... is not implemented") naming what
// it is: 8-bit (LLM.int8), fp4 (also transformers' default bnb_4bit_quant_type), a quant_storage other than
// uint8, or another quant_method (gptq, awq, ...). Keys it does not know are warnings.
std::optional<BnbConfig> parse_quantization_config(const nlohmann::json& v, const std::string& source,
                                                   std::vector<std::string>* warnings);

// Whether transformers' replace_with_bnb_linear leaves projection `p` of `layer` unquantized for this skip list
// (integrations/bitsandbytes.py: a key equal to the module's name or full path, or a prefix of it ending in '.').
bool bnb_skips(const std::vector<std::string>& skip_modules, int64_t layer, Proj p);

// The bitsandbytes layout of one checkpoint: `weights` as read (float tensors) and `bytes` (the U8 tensors).
// For every projection the config has and the skip list does not exempt, reads `<module>.weight` (packed U8
// [(n+1)/2, 1]) and its quant state (`.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map`,
// `.quant_state.bitsandbytes__nf4`), checks all of it against the config and each other, and puts the
// dequantized weight in `weights` under `<module>.weight`. Every problem is an InputError naming `source`, the
// tensor and what is wrong; a U8 tensor left over is refused. Tensors of layers beyond the config's depth are
// dropped when `allow_deeper` (--layers), as validate_checkpoint drops them. A projection stored as floats although
// the skip list does not exempt it is refused, as transformers refuses it. Names are those of
// normalize_checkpoint_names (`model.layers.N...`), which runs first.
// With `forms`, each quantized projection's NF4 form is also put there under its HF name (proj_weight_name),
// for the CUDA trainer, which keeps the base in that form (Checkpoint::nf4).
void dequantize_bnb_checkpoint(TensorMap& weights, ByteTensorMap& bytes, const Config& c, const BnbConfig& q,
                               const std::string& source, bool allow_deeper,
                               std::map<std::string, Nf4Weight>* forms = nullptr);

// --quantize nf4: every projection weight of every layer quantized as QLoRA does (nf4, blocksize 64, double
// quantization) and replaced by its dequantized value (its form kept in ck.nf4); embeddings and norms untouched (transformers quantizes
// nn.Linear modules only, and the tied LM head is kept). Returns one line for the run's description.
std::string quantize_base_projections(Checkpoint& ck);

}  // namespace gemma
