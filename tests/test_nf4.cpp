// QLoRA's NF4 base (issue 18, the CPU side): bitsandbytes' quantization written out by hand for a few blocks,
// the packing order, double quantization, a checkpoint in bitsandbytes' saved layout read back exactly, every
// malformed piece of such a checkpoint refused naming it, and `verify --quantize nf4` passing.
// Expected codes and values below were worked out from the formulas in model/nf4.hpp (bitsandbytes' kernels), with
// float32 and bf16 rounding done by hand in Python's struct, not by the code under test.
#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>

#include "model/nf4.hpp"
#include "model/safetensors.hpp"
#include "model/synthetic.hpp"
#include "tests/badinput_support.hpp"
#include "tests/tiny_case.hpp"

using namespace gemma;
using namespace gemma::test;
using nlohmann::json;

namespace {

const std::string kVerify = GEMMA_VERIFY_BIN;

Tensor bf16_row(const std::vector<double>& v) { return tensor_from_doubles(DType::bf16, {1, int64_t(v.size())}, v); }

std::vector<uint16_t> bf16_bits(const Tensor& t) {
  std::vector<uint16_t> r(size_t(t.numel()));
  std::memcpy(r.data(), t.bytes.get(), r.size() * 2);
  return r;
}

// Three blocks of a [1, 131] weight: absmax 3 (1/3 is no float32 number), an all-zero block, and a short last block
// of an odd count (a padded low nibble).
std::vector<double> three_blocks() {
  std::vector<double> x(131, 0.0);
  const double first[] = {3, -3, 0, 1, -1, 2, -2, 0.5, -0.5, 0.25, -0.25, 1.5, 1.625, -1.25, -1.5, 2.75, 0.0625};
  std::copy(std::begin(first), std::end(first), x.begin());
  x[128] = 0.5, x[129] = -0.25, x[130] = 1.0;
  return x;
}

}  // namespace

TEST(Nf4, CodeBookIsBitsandbytes) {
  // csrc/kernels.cu nf4_dequantization_lut: ascending, exactly -1, 0 and 1 at codes 0, 7 and 15.
  EXPECT_EQ(kNF4[0], -1.0f);
  EXPECT_EQ(kNF4[7], 0.0f);
  EXPECT_EQ(kNF4[15], 1.0f);
  for (int c = 1; c < 16; ++c) EXPECT_LT(kNF4[size_t(c - 1)], kNF4[size_t(c)]);
  EXPECT_EQ(float_bits(kNF4[1]), float_bits(-0.6961928009986877f));
  EXPECT_EQ(float_bits(kNF4[14]), float_bits(0.7229568362236023f));
}

TEST(Nf4, TreeCodesTheNearestBookValue) {
  // dQuantizeNF4's thresholds are the midpoints of neighbouring book values (as float32 literals), so away from
  // them the tree's code is the nearest value's: every code is reached, in order, with no gap or swap in the tree.
  int last = 0;
  for (int k = -200000; k <= 200000; ++k) {
    const float x = float(k) / 200000.0f;
    int nearest = 0;
    double d1 = 9, d2 = 9;  // the nearest and second-nearest distances
    for (int c = 0; c < 16; ++c) {
      const double d = std::fabs(double(x) - double(kNF4[size_t(c)]));
      if (d < d1) {
        d2 = d1;
        d1 = d;
        nearest = c;
      } else if (d < d2) {
        d2 = d;
      }
    }
    if (d2 - d1 > 1e-6) {
      ASSERT_EQ(nf4_code(x), nearest) << "x = " << x;
    }
    ASSERT_GE(nf4_code(x), last) << "x = " << x;
    last = nf4_code(x);
  }
  EXPECT_EQ(last, 15);
}

TEST(Nf4, HandComputedBlocksQuantizeToTheirCodes) {
  const Nf4Weight q = quantize_nf4(bf16_row(three_blocks()), 64, false);
  // absmax per block: 3, 0 (all zero), 1.
  ASSERT_EQ(q.absmax.size(), 3u);
  EXPECT_EQ(q.absmax[0], 3.0f);
  EXPECT_EQ(q.absmax[1], 0.0f);
  EXPECT_EQ(q.absmax[2], 1.0f);
  // x * float32(1/3): 3 -> 1 (15), -3 -> -1 (0), 0 (7), 1 -> 0.333 (11), -1 -> -0.333 (4), 2 -> 0.667 (14),
  // -2 (1), 0.5 -> 0.167 (9), -0.5 (5), 0.25 -> 0.083 (8), -0.25 (6), 1.5 -> 0.5 (12), 1.625 -> 0.542 (13),
  // -1.25 -> -0.417 (3), -1.5 -> -0.5 (2), 2.75 -> 0.917 (15), 0.0625 -> 0.021 (7), zeros (7).
  const int want[] = {15, 0, 7, 11, 4, 14, 1, 9, 5, 8, 6, 12, 13, 3, 2, 15, 7};
  for (int i = 0; i < 17; ++i) EXPECT_EQ(q.code(i), want[i]) << "element " << i;
  for (int i = 17; i < 64; ++i) EXPECT_EQ(q.code(i), 7) << "element " << i;
  // The zero block: 0 * (1/0) is NaN, which fails every comparison of the tree: code 0.
  for (int i = 64; i < 128; ++i) EXPECT_EQ(q.code(i), 0) << "element " << i;
  // Absmax 1: 0.5 (12), -0.25 (4), 1 (15).
  EXPECT_EQ(q.code(128), 12);
  EXPECT_EQ(q.code(129), 4);
  EXPECT_EQ(q.code(130), 15);
}

TEST(Nf4, PackingPutsTheFirstElementInTheHighNibble) {
  const Nf4Weight q = quantize_nf4(bf16_row(three_blocks()), 64, false);
  ASSERT_EQ(q.packed.size(), 66u);  // (131 + 1) / 2
  const uint8_t first[] = {0xF0, 0x7B, 0x4E, 0x19, 0x58, 0x6C, 0xD3, 0x2F, 0x77};
  for (int j = 0; j < 9; ++j) EXPECT_EQ(q.packed[size_t(j)], first[j]) << "byte " << j;
  for (int j = 9; j < 32; ++j) EXPECT_EQ(q.packed[size_t(j)], 0x77) << "byte " << j;
  for (int j = 32; j < 64; ++j) EXPECT_EQ(q.packed[size_t(j)], 0x00) << "byte " << j;
  EXPECT_EQ(q.packed[64], 0xC4);
  EXPECT_EQ(q.packed[65], 0xF0);  // element 130 high, the padding code 0 low
}

TEST(Nf4, HandComputedBlocksDequantizeToBf16OfTheFloat32Product) {
  const Tensor w = dequantize_nf4(quantize_nf4(bf16_row(three_blocks()), 64, false));
  ASSERT_EQ(w.dtype, DType::bf16);
  const std::vector<uint16_t> got = bf16_bits(w);
  // bf16(float32(kNF4[c] * 3)), by hand: c15 3.0, c0 -3.0, c7 0, c11 1.015625, c4 -0.8515625, c14 2.171875,
  // c1 -2.09375, c9 0.482421875, c5 -0.5546875, c8 0.23828125, c6 -0.2734375, c12 1.3203125, c13 1.6875,
  // c3 -1.1875, c2 -1.578125.
  const uint16_t first[] = {0x4040, 0xc040, 0x0000, 0x3f82, 0xbf5a, 0x400b, 0xc006, 0x3ef7, 0xbf0e,
                            0x3e74, 0xbe8c, 0x3fa9, 0x3fd8, 0xbf98, 0xbfca, 0x4040, 0x0000};
  for (int i = 0; i < 17; ++i) EXPECT_EQ(got[size_t(i)], first[i]) << "element " << i;
  // The zero block comes back as kNF4[0] * 0 = -0.0, as bitsandbytes' kernel returns it.
  for (int i = 64; i < 128; ++i) EXPECT_EQ(got[size_t(i)], 0x8000) << "element " << i;
  // Absmax 1: bf16 of the code values 0.4407..., -0.2844..., 1.
  EXPECT_EQ(got[128], 0x3ee2);
  EXPECT_EQ(got[129], 0xbe92);
  EXPECT_EQ(got[130], 0x3f80);
}

TEST(Nf4, DequantizationRoundsTheFloat32ProductNotTheExactOne) {
  // A decoded (double-quantized) absmax is any float32, so kNF4[c] * absmax can need more than float32's 24 bits.
  // kNF4[13] * 0x1.b0cc82p-1 (0.84531027) = 0.47558593193..., whose float32 rounding 0.4755859375 is exactly halfway
  // between the bf16 numbers 0x3ef3 and 0x3ef4 and goes to the even 0x3ef4; rounding the exact product directly
  // would give 0x3ef3. bitsandbytes' kernel rounds the float32 product, so 0x3ef4 is right.
  Nf4Weight q;
  q.shape = {1, 2};
  q.packed = {0xDD};
  q.absmax = {bits_float(0x3f586641u)};
  for (uint16_t b : bf16_bits(dequantize_nf4(q))) EXPECT_EQ(b, 0x3ef4);
}

TEST(Nf4, DynamicMapIsCreateDynamicMap) {
  const std::vector<float>& m = dynamic_map();
  ASSERT_EQ(m.size(), 256u);
  for (size_t k = 1; k < m.size(); ++k) EXPECT_LT(m[k - 1], m[k]) << k;
  EXPECT_EQ(m[127], 0.0f);
  EXPECT_EQ(m[255], 1.0f);
  // By hand in float32: the smallest positive entry 1e-6 * (0.1 + 1) / 2, the largest below 1 the mean of the last
  // two of linspace(0.1, 1, 65) (1 - 0.9/64 and 1).
  EXPECT_EQ(float_bits(m[128]), 0x3513a3b7u);
  EXPECT_EQ(float_bits(m[254]), 0x3f7e3333u);
  EXPECT_EQ(m[0], -m[254]);
  // Every entry codes to itself; 0 to the zero entry.
  for (int k = 0; k < 256; ++k) EXPECT_EQ(dynamic_code(m, m[size_t(k)]), k);
  EXPECT_EQ(dynamic_code(m, 0.0f), 127);
}

TEST(Nf4, DoubleQuantizationOfEqualAbsmaxIsExact) {
  // Every block's absmax is 3: the offset is 3, the centred absmax all 0, the nested absmax 0, whose reciprocal is
  // inf; 0 * inf = NaN walks to code 0; decoding gives dynamic_map[0] * 0 = -0, plus 3 = 3 exactly.
  std::vector<double> x(4 * 64, 0.5);
  for (int b = 0; b < 4; ++b) x[size_t(b * 64 + b)] = -3.0;
  const Tensor w = tensor_from_doubles(DType::bf16, {4, 64}, x);
  const Nf4Weight q = quantize_nf4(w, 64, true);
  ASSERT_TRUE(q.nested);
  EXPECT_EQ(q.nested_offset, 3.0f);
  ASSERT_EQ(q.nested_absmax.size(), 1u);
  EXPECT_EQ(q.nested_absmax[0], 0.0f);
  for (uint8_t c : q.absmax_codes) EXPECT_EQ(c, 0);
  for (float a : nf4_absmax(q)) EXPECT_EQ(a, 3.0f);
  EXPECT_EQ(bf16_bits(dequantize_nf4(q)), bf16_bits(dequantize_nf4(quantize_nf4(w, 64, false))));
}

TEST(Nf4, DoubleQuantizationRoundTripIsWithinItsCodeSpacing) {
  // 600 blocks (3 nested blocks, the last partial) of synthetic weights: each decoded absmax is the offset plus
  // a dynamic-map entry times the nested absmax; the map's entries near +-1 are 1/64 apart (the top decade's
  // linspace), so the decoded value is within half that spacing of the nested absmax, plus float32 roundings.
  const Config c = preset("gemma2-tiny");
  Tensor w = synthetic_weights(c, 7).at(proj_weight_name(0, Proj::gate_proj));  // [160, 64]: 160 blocks
  std::vector<double> big = w.to_double();
  std::vector<double> x;
  for (int rep = 0; rep < 4; ++rep)
    for (size_t i = 0; i < big.size() * 15 / 16; ++i) x.push_back(big[i] * (1.0 + 0.3 * rep));
  const int64_t n = int64_t(x.size());  // 38400 = 600 * 64
  const Nf4Weight q = quantize_nf4(tensor_from_doubles(DType::bf16, {n / 64, 64}, x), 64, true);
  const Nf4Weight plain = quantize_nf4(tensor_from_doubles(DType::bf16, {n / 64, 64}, x), 64, false);
  ASSERT_EQ(q.absmax_codes.size(), 600u);
  ASSERT_EQ(q.nested_absmax.size(), 3u);
  EXPECT_EQ(q.packed, plain.packed);  // double quantization changes the absmax only, never the codes
  const std::vector<float> got = nf4_absmax(q);
  for (size_t i = 0; i < got.size(); ++i) {
    const double nested = q.nested_absmax[i / 256];
    EXPECT_LE(std::fabs(double(got[i]) - double(plain.absmax[i])), nested / 128 + 1e-6 * plain.absmax[i]) << i;
  }
}

// ------------------------------------------------------------------------------------------------------------
// Checkpoints in bitsandbytes' layout (Linear4bit._save_to_state_dict, QuantState.as_dict(packed=True)).

namespace {

struct Entry {
  std::string dtype;  // safetensors' spelling: U8, F32, BF16
  Shape shape;
  std::string bytes;
};
using Entries = std::map<std::string, Entry>;

template <class T>
std::string raw(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

void write_entries(const std::string& path, const Entries& e) {
  json h = json::object();
  std::string data;
  for (const auto& [n, x] : e) {
    h[n] = {{"dtype", x.dtype}, {"shape", x.shape}, {"data_offsets", {data.size(), data.size() + x.bytes.size()}}};
    data += x.bytes;
  }
  const std::string text = h.dump();
  const uint64_t len = text.size();
  spit(path, std::string(reinterpret_cast<const char*>(&len), 8) + text + data);
}

json quant_state_json(const Nf4Weight& q) {
  json s = {{"quant_type", "nf4"}, {"blocksize", q.blocksize}, {"dtype", "bfloat16"}, {"shape", q.shape}};
  if (q.nested) {
    s["nested_blocksize"] = q.nested_blocksize;
    s["nested_dtype"] = "float32";
    s["nested_offset"] = double(q.nested_offset);
  }
  return s;
}

void put_quantized(Entries& e, const std::string& w, const Nf4Weight& q) {
  e[w] = {"U8", {(q.numel() + 1) / 2, 1}, raw(q.packed)};
  e[w + ".quant_map"] = {"F32", {16}, raw(std::vector<float>(kNF4.begin(), kNF4.end()))};
  if (q.nested) {
    e[w + ".absmax"] = {"U8", {q.blocks()}, raw(q.absmax_codes)};
    e[w + ".nested_absmax"] = {"F32", {int64_t(q.nested_absmax.size())}, raw(q.nested_absmax)};
    e[w + ".nested_quant_map"] = {"F32", {256}, raw(q.nested_quant_map)};
  } else {
    e[w + ".absmax"] = {"F32", {q.blocks()}, raw(q.absmax)};
  }
  const std::string js = quant_state_json(q).dump();
  e[w + ".quant_state.bitsandbytes__nf4"] = {"U8", {int64_t(js.size())}, js};
}

json bnb_config_json() {
  return {{"quant_method", "bitsandbytes"},  {"_load_in_4bit", true},           {"_load_in_8bit", false},
          {"load_in_4bit", true},            {"load_in_8bit", false},           {"bnb_4bit_quant_type", "nf4"},
          {"bnb_4bit_use_double_quant", true}, {"bnb_4bit_compute_dtype", "bfloat16"},
          {"bnb_4bit_quant_storage", "uint8"}, {"llm_int8_skip_modules", nullptr}, {"llm_int8_threshold", 6.0},
          {"llm_int8_has_fp16_weight", false}, {"llm_int8_enable_fp32_cpu_offload", false}};
}

// gemma2-tiny saved as transformers saves a bnb-4bit model: the seven projections of each layer packed with their
// quant state (nested = bnb_4bit_use_double_quant), embeddings and norms as BF16.
struct BnbCheckpoint {
  std::string config, weights;
  TensorMap expected;  // the dequantized weights the reader must produce
};
BnbCheckpoint write_bnb(const TempDir& d, const std::function<void(Entries&)>& mutate = {},
                        const std::function<void(json&)>& mutate_config = {}, bool nested = true) {
  const Config c = preset("gemma2-tiny");
  const TensorMap w = synthetic_weights(c, 5);
  Entries e;
  BnbCheckpoint ck{d / "config.json", d / "model.safetensors", {}};
  for (const auto& [n, t] : w) {
    bool proj = false;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      for (Proj p : kAllProj) proj |= n == proj_weight_name(l, p);
    if (proj) {
      const Nf4Weight q = quantize_nf4(t, 64, nested);
      put_quantized(e, n, q);
      ck.expected.emplace(n, dequantize_nf4(q));
    } else {
      e[n] = {"BF16", t.shape, std::string(reinterpret_cast<const char*>(t.bytes.get()), size_t(t.numel()) * 2)};
      ck.expected.emplace(n, t);
    }
  }
  if (mutate) mutate(e);
  write_entries(ck.weights, e);
  json cj = json::parse(to_config_json(c));
  cj["quantization_config"] = bnb_config_json();
  if (mutate_config) mutate_config(cj);
  spit(ck.config, cj.dump(2));
  return ck;
}

Checkpoint load(const BnbCheckpoint& ck) { return load_hf_checkpoint(ck.config, ck.weights, std::nullopt, std::nullopt); }

const std::string kQ = "model.layers.0.self_attn.q_proj.weight";  // [64, 64]: 64 blocks, one nested block

void expect_same_weights(const TensorMap& got, const TensorMap& want) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [n, t] : want) {
    SCOPED_TRACE(n);
    ASSERT_TRUE(got.count(n));
    const Tensor& g = got.at(n);
    ASSERT_EQ(g.dtype, t.dtype);
    ASSERT_EQ(g.shape, t.shape);
    EXPECT_EQ(std::memcmp(g.bytes.get(), t.bytes.get(), size_t(t.numel()) * dtype_size(t.dtype)), 0);
  }
}

// Checkpoint::nf4, which the CUDA trainer keeps on the device instead of the weights: exactly the projections
// `quantized` says (by HF name, whatever the file called them), each dequantizing to the very bits in `weights`.
void expect_forms(const Checkpoint& got, const std::function<bool(int64_t, Proj)>& quantized, bool nested) {
  int64_t forms = 0;
  for (int64_t l = 0; l < got.config.num_hidden_layers; ++l)
    for (Proj p : kAllProj) {
      const std::string n = proj_weight_name(l, p);
      SCOPED_TRACE(n);
      auto it = got.nf4.find(n);
      ASSERT_EQ(it != got.nf4.end(), quantized(l, p));
      if (it == got.nf4.end()) continue;
      ++forms;
      EXPECT_EQ(it->second.nested, nested);
      EXPECT_EQ(bf16_bits(dequantize_nf4(it->second)), bf16_bits(got.weights.at(n)));
    }
  EXPECT_EQ(int64_t(got.nf4.size()), forms) << "forms of tensors that are no quantized projection";
}

}  // namespace

TEST(BnbCheckpoint, DoubleQuantizedCheckpointLoadsDequantizedExactly) {
  TempDir d;
  const BnbCheckpoint ck = write_bnb(d);
  const Checkpoint got = load(ck);
  expect_same_weights(got.weights, ck.expected);
  ASSERT_TRUE(got.quantization.has_value());
  EXPECT_NE(got.quantization->find("nf4"), std::string::npos);
  EXPECT_TRUE(got.warnings.empty()) << got.warnings[0];
  expect_forms(got, [](int64_t, Proj) { return true; }, true);
}

TEST(BnbCheckpoint, PlainAbsmaxCheckpointLoadsDequantizedExactly) {
  TempDir d;
  const BnbCheckpoint ck = write_bnb(d, {}, [](json& c) { c["quantization_config"]["bnb_4bit_use_double_quant"] = false; }, false);
  const Checkpoint got = load(ck);
  expect_same_weights(got.weights, ck.expected);
  expect_forms(got, [](int64_t, Proj) { return true; }, false);
}

TEST(BnbCheckpoint, ReaderUsesTheFilesStateNotARecomputation) {
  // A hand-made quant state: every code 15 (1.0), the absmax decoded from nested code 255 (1.0 in the map) times
  // nested absmax 0.5, plus offset 0.25: 0.75 for every block; every weight is bf16(1.0 * 0.75) = 0x3f40.
  TempDir d;
  const BnbCheckpoint ck = write_bnb(d, [](Entries& e) {
    e[kQ].bytes.assign(e[kQ].bytes.size(), char(0xFF));
    e[kQ + ".absmax"].bytes.assign(64, char(0xFF));
    e[kQ + ".nested_absmax"].bytes = raw(std::vector<float>{0.5f});
    json s = json::parse(e[kQ + ".quant_state.bitsandbytes__nf4"].bytes);
    s["nested_offset"] = 0.25;
    e[kQ + ".quant_state.bitsandbytes__nf4"].bytes = s.dump();
    e[kQ + ".quant_state.bitsandbytes__nf4"].shape = {int64_t(s.dump().size())};
  });
  const Checkpoint got = load(ck);
  for (uint16_t b : bf16_bits(got.weights.at(kQ))) ASSERT_EQ(b, 0x3f40);
}

TEST(BnbCheckpoint, ShardedCheckpointLoadsDequantizedExactly) {
  // Two shards and model.safetensors.index.json, the packed weight and its quant state in different shards.
  TempDir d;
  Entries all;
  const BnbCheckpoint ck = write_bnb(d, [&](Entries& e) { all = e; });
  Entries first, second;
  json index = {{"metadata", json::object()}, {"weight_map", json::object()}};
  for (const auto& [n, x] : all) {
    const bool one = n.find(".weight.") == std::string::npos;  // packed weights and float tensors / quant states
    (one ? first : second)[n] = x;
    index["weight_map"][n] = one ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  write_entries(d / "model-00001-of-00002.safetensors", first);
  write_entries(d / "model-00002-of-00002.safetensors", second);
  spit(d / "model.safetensors.index.json", index.dump());
  const Checkpoint got = load_hf_checkpoint(ck.config, d / "model.safetensors.index.json", std::nullopt, std::nullopt);
  expect_same_weights(got.weights, ck.expected);
}

TEST(BnbCheckpoint, SkippedModuleLoadsAsStored) {
  TempDir d;
  const Config c = preset("gemma2-tiny");
  const TensorMap w = synthetic_weights(c, 5);
  BnbCheckpoint ck = write_bnb(
      d,
      [&](Entries& e) {
        for (int64_t l = 0; l < 2; ++l) {
          const std::string n = proj_weight_name(l, Proj::down_proj);
          for (const char* k : {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"})
            e.erase(n + k);
          const Tensor& t = w.at(n);
          e[n] = {"BF16", t.shape, std::string(reinterpret_cast<const char*>(t.bytes.get()), size_t(t.numel()) * 2)};
        }
      },
      [](json& cj) { cj["quantization_config"]["llm_int8_skip_modules"] = {"down_proj"}; });
  for (int64_t l = 0; l < 2; ++l) ck.expected[proj_weight_name(l, Proj::down_proj)] = w.at(proj_weight_name(l, Proj::down_proj));
  const Checkpoint got = load(ck);
  expect_same_weights(got.weights, ck.expected);
  expect_forms(got, [](int64_t, Proj p) { return p != Proj::down_proj; }, true);
}

TEST(BnbCheckpoint, LayersFlagDropsDeeperQuantizedLayers) {
  TempDir d;
  const BnbCheckpoint ck = write_bnb(d);
  const Checkpoint got = load_hf_checkpoint(ck.config, ck.weights, std::nullopt, int64_t(1));
  EXPECT_EQ(got.weights.at(kQ).shape, (Shape{64, 64}));
  EXPECT_FALSE(got.weights.count(proj_weight_name(1, Proj::q_proj)));
  expect_forms(got, [](int64_t l, Proj) { return l == 0; }, true);
}

// quantization_config values that are refused, each naming what it is.
TEST(BnbCheckpoint, RefusesQuantizationsNotImplemented) {
  TempDir d;
  auto with = [&](const char* key, const json& v) {
    return [=](json& c) {
      if (v.is_null()) c["quantization_config"].erase(key);
      else c["quantization_config"][key] = v;
    };
  };
  struct Case {
    std::function<void(json&)> edit;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {with("bnb_4bit_quant_type", "fp4"), "\"fp4\""},
      {with("bnb_4bit_quant_type", nullptr), "transformers' default, fp4"},
      {with("load_in_8bit", true), "8-bit"},
      {with("quant_method", "gptq"), "\"gptq\""},
      {with("quant_method", "awq"), "\"awq\""},
      {with("bnb_4bit_quant_storage", "bfloat16"), "bnb_4bit_quant_storage"},
      {with("bnb_4bit_compute_dtype", "int8"), "bnb_4bit_compute_dtype"},
      {with("llm_int8_skip_modules", "q_proj"), "llm_int8_skip_modules"},
      {[](json& c) { c["quantization_config"] = "nf4"; }, "must be null or an object"},
      {[](json& c) { c["quantization_config"] = {{"load_in_4bit", false}, {"quant_method", "bitsandbytes"}}; },
       "without load_in_4bit"},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.needle);
    const BnbCheckpoint ck = write_bnb(d, {}, k.edit);
    expect_input_error([&] { load(ck); }, {"config.json: quantization_config", k.needle});
  }
}

// A malformed piece of the saved layout, each refused naming the file, the tensor and the problem.
TEST(BnbCheckpoint, RefusesMalformedQuantState) {
  TempDir d;
  const std::string qs = kQ + ".quant_state.bitsandbytes__nf4";
  auto state = [&](const std::function<void(json&)>& f) {
    return [=](Entries& e) {
      json s = json::parse(e[qs].bytes);
      f(s);
      e[qs].bytes = s.dump();
      e[qs].shape = {int64_t(e[qs].bytes.size())};
    };
  };
  struct Case {
    std::function<void(Entries&)> edit;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {[&](Entries& e) { e[kQ + ".quant_state.bitsandbytes__fp4"] = e[qs]; e.erase(qs); }, {"bitsandbytes__fp4", "fp4 is not implemented"}},
      {[&](Entries& e) { e.erase(qs); }, {"missing", qs}},
      {[&](Entries& e) { e[qs].bytes = "{\"quant_type\": "; e[qs].shape = {15}; }, {qs, "not the JSON of a quant state"}},
      {state([](json& s) { s["quant_type"] = "fp4"; }), {qs, "quant_type \"fp4\" is not nf4"}},
      {state([](json& s) { s["blocksize"] = 48; }), {qs, "blocksize 48"}},
      {state([](json& s) { s["dtype"] = "float64"; }), {qs, "dtype \"float64\""}},
      {state([](json& s) { s["shape"] = {64, 32}; }), {qs, "shape [64,32]", "[64, 64]"}},
      {state([](json& s) { s["surprise"] = 1; }), {qs, "'surprise'"}},
      {state([](json& s) { s.erase("nested_offset"); s.erase("nested_dtype"); s.erase("nested_blocksize"); }),
       {qs, "nested_absmax or nested_quant_map is there"}},
      {state([](json& s) { s["nested_dtype"] = "bfloat16"; }), {qs, "nested_dtype"}},
      {state([](json& s) { s["nested_offset"] = "0.1"; }), {qs, "nested_offset"}},
      {state([](json& s) { s["nested_blocksize"] = 100; }), {qs, "nested_blocksize 100"}},
      {[&](Entries& e) { e[kQ].shape = {2048}; }, {"'" + kQ + "'", "[2048]", "[2048, 1]"}},
      {[&](Entries& e) { e[kQ].shape = {1024, 1}; e[kQ].bytes.resize(1024); }, {"'" + kQ + "'", "[1024, 1]"}},
      {[&](Entries& e) { e[kQ + ".absmax"].shape = {63}; e[kQ + ".absmax"].bytes.resize(63); }, {kQ + ".absmax", "64 absmax"}},
      {[&](Entries& e) { e[kQ + ".absmax"] = {"F32", {64}, std::string(256, '\0')}; }, {kQ + ".absmax", "stores it as U8"}},
      {[&](Entries& e) { e.erase(kQ + ".absmax"); }, {"missing", kQ + ".absmax"}},
      {[&](Entries& e) { e[kQ + ".quant_map"].bytes[4] ^= 1; }, {kQ + ".quant_map", "entry 1", "not NF4's"}},
      {[&](Entries& e) { e[kQ + ".quant_map"].dtype = "U8"; e[kQ + ".quant_map"].shape = {64}; }, {kQ + ".quant_map", "stores it as F32"}},
      {[&](Entries& e) { e.erase(kQ + ".nested_absmax"); e.erase(kQ + ".nested_quant_map"); },
       {qs, "nested tensors are missing"}},
      {[&](Entries& e) { e[kQ + ".nested_absmax"].shape = {2}; e[kQ + ".nested_absmax"].bytes.resize(8); },
       {kQ + ".nested_absmax", "[2]", "expected [1]"}},
      {[&](Entries& e) { e[kQ + ".nested_quant_map"].shape = {255}; e[kQ + ".nested_quant_map"].bytes.resize(1020); },
       {kQ + ".nested_quant_map", "expected [256]"}},
      {[&](Entries& e) {
         const float inf = INFINITY;
         e[kQ + ".nested_absmax"].bytes = std::string(reinterpret_cast<const char*>(&inf), 4);
       },
       {kQ + ".nested_absmax", "non-finite"}},
      {[&](Entries& e) { e["model.layers.0.self_attn.q_proj.weight.stray"] = {"U8", {3}, "abc"}; },
       {"'model.layers.0.self_attn.q_proj.weight.stray'", "U8", "no part of"}},
      {[&](Entries& e) { e["model.layers.7.mlp.up_proj.weight"] = e[kQ]; }, {"model.layers.7.mlp.up_proj.weight", "layer 7"}},
      {[&](Entries& e) { e[kQ].dtype = "I8"; }, {"'" + kQ + "'", "dtype I8"}},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.needles[0]);
    const BnbCheckpoint ck = write_bnb(d, k.edit);
    std::vector<std::string> needles = {ck.weights + ": "};
    needles.insert(needles.end(), k.needles.begin(), k.needles.end());
    expect_input_error([&] { load(ck); }, needles);
  }
}

TEST(BnbCheckpoint, RefusesPackedWeightOfASkippedModule) {
  TempDir d;
  const BnbCheckpoint ck = write_bnb(d, {}, [](json& c) { c["quantization_config"]["llm_int8_skip_modules"] = {"self_attn"}; });
  expect_input_error([&] { load(ck); }, {ck.weights, kQ, "llm_int8_skip_modules"});
}

TEST(BnbCheckpoint, RefusesU8TensorsWithoutQuantizationConfig) {
  TempDir d;
  const BnbCheckpoint ck = write_bnb(d, {}, [](json& c) { c.erase("quantization_config"); });
  expect_input_error([&] { load(ck); }, {ck.weights, "dtype U8", "no quantization_config"});
}

// A projection stored as floats in a checkpoint whose config quantizes it: transformers takes the checkpoint for
// pre-quantized and refuses the float weight ("does not contain bitsandbytes__*"). It used to be quantized here on
// load, a model HF would not have loaded.
TEST(BnbCheckpoint, RefusesAFloatProjectionAsTransformersDoes) {
  TempDir d;
  const Config c = preset("gemma2-tiny");
  const Tensor q0 = synthetic_weights(c, 5).at(kQ);
  BnbCheckpoint ck = write_bnb(d, [&](Entries& e) {
    for (const char* k : {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"})
      e.erase(kQ + k);
    e[kQ] = {"BF16", q0.shape, std::string(reinterpret_cast<const char*>(q0.bytes.get()), size_t(q0.numel()) * 2)};
  });
  expect_input_error([&] { load(ck); }, {ck.weights, kQ, "stored as floats although quantization_config quantizes",
                                         "bitsandbytes__*"});
}

// The same packed checkpoint under PEFT's prefix and as a bare Gemma2Model reads as under HF's names. The
// quantized projections were looked for under `model.layers.N...` before the names were normalised: a prefixed or
// bare file's float projections escaped quantization while the run said its base was NF4, and its packed ones
// were refused as "no part of a bitsandbytes 4-bit projection weight".
TEST(BnbCheckpoint, PrefixedAndBareNamesReadAsHFNames) {
  for (const auto& [from, to] : {std::pair<std::string, std::string>{"model.", "base_model.model.model."},
                                 std::pair<std::string, std::string>{"model.", ""}}) {
    SCOPED_TRACE("'" + to + "'");
    TempDir d;
    BnbCheckpoint ck = write_bnb(d, [&](Entries& e) {
      Entries renamed;
      for (auto& [n, v] : e) renamed[n.rfind(from, 0) == 0 ? to + n.substr(from.size()) : n] = v;
      e = renamed;
    });
    const Checkpoint got = load(ck);
    expect_same_weights(got.weights, ck.expected);
    expect_forms(got, [](int64_t, Proj) { return true; }, true);
  }
  // Float projections under those names are refused as under HF's.
  TempDir d;
  const Tensor q0 = synthetic_weights(preset("gemma2-tiny"), 5).at(kQ);
  BnbCheckpoint ck = write_bnb(d, [&](Entries& e) {
    for (const char* k : {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"})
      e.erase(kQ + k);
    e["base_model.model." + kQ] = {"BF16", q0.shape, std::string(reinterpret_cast<const char*>(q0.bytes.get()), size_t(q0.numel()) * 2)};
  });
  expect_input_error([&] { load(ck); }, {ck.weights, kQ, "stored as floats"});
}

// ------------------------------------------------------------------------------------------------------------
// --quantize nf4 on the command line.

TEST(QuantizeFlag, ReplacesEveryProjectionAndNothingElse) {
  Checkpoint ck;
  ck.config = preset("gemma2-tiny");
  ck.weights = synthetic_weights(ck.config, 3);
  const TensorMap before = ck.weights;
  const std::string line = quantize_base_projections(ck);
  EXPECT_NE(line.find("14 base projection weights"), std::string::npos) << line;
  for (const auto& [n, t] : before) {
    SCOPED_TRACE(n);
    const bool proj = n.find("_proj.") != std::string::npos;
    const Tensor& g = ck.weights.at(n);
    const Tensor want = proj ? dequantize_nf4(quantize_nf4(t, 64, true)) : t;
    EXPECT_EQ(std::memcmp(g.bytes.get(), want.bytes.get(), size_t(t.numel()) * 2), 0);
    if (proj) {
      EXPECT_NE(std::memcmp(g.bytes.get(), t.bytes.get(), size_t(t.numel()) * 2), 0) << "unchanged";
    }
  }
  expect_forms(ck, [](int64_t, Proj) { return true; }, true);
  expect_input_error([&] { quantize_base_projections(ck); }, {"--quantize", "already quantized"});
}

TEST(QuantizeFlag, VerifyPassesOnTinyWithNf4Base) {
  TempDir d;
  const ToolRun r = run_tool(kVerify, {"--model", "gemma2-tiny", "--quantize", "nf4", "--backend", "reference"}, d,
                             {"OMP_NUM_THREADS=1"});
  ASSERT_TRUE(r.exited);
  EXPECT_EQ(r.status, 0) << r.err << r.out;
  EXPECT_NE(r.out.find("NF4-quantized as QLoRA does"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("sha256 matches"), std::string::npos) << "a golden of the unquantized weights was used:\n" << r.out;
}

TEST(QuantizeFlag, VerifyPassesOnABnbCheckpoint) {
  TempDir d;
  const BnbCheckpoint ck = write_bnb(d);
  const ToolRun r = run_tool(kVerify, {"--config", ck.config, "--weights", ck.weights, "--seq", "12", "--lora-r", "2",
                                       "--backend", "reference"},
                             d, {"OMP_NUM_THREADS=1"});
  ASSERT_TRUE(r.exited);
  EXPECT_EQ(r.status, 0) << r.err << r.out;
  EXPECT_NE(r.out.find("dequantized on load"), std::string::npos) << r.out;
}

TEST(QuantizeFlag, RefusedWhereItCannotApply) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-tiny", "--quantize", "fp4"}, d), "verify",
                  {"--quantize", "'fp4' is not nf4"});
  const BnbCheckpoint ck = write_bnb(d);
  expect_rejected(run_tool(kVerify, {"--config", ck.config, "--weights", ck.weights, "--quantize", "nf4"}, d), "verify",
                  {"--quantize", "already quantized"});
  write_case(d / "case.h5", tiny_case());
  expect_rejected(run_tool(kVerify, {"--case", d / "case.h5", "--quantize", "nf4"}, d), "verify",
                  {"--quantize", "does not apply to --case"});
}
