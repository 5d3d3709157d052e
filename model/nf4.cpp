#include "nf4.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "errors.hpp"
#include "json_brief.hpp"
#include "json_text.hpp"

namespace gemma {

using nlohmann::json;

const std::vector<float>& dynamic_map() {
  // functional.py create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for each decade
  // i = 0..6, the 2^i midpoints of torch.linspace(0.1, 1, 2^i + 1) (float32) scaled by 10^(i-6), with both
  // signs; then 0 and 1; 254 + 2 = 256 values, sorted.
  // torch's CPU linspace (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp) computes step = (end - start) /
  // (steps - 1) in float32 and the first half as start + step * idx, the second as end - step * (steps - 1 -
  // idx). Here each of those is two float32 roundings; a torch build that fused them into one FMA would differ
  // in the last bit of a few entries. A checkpoint's own nested_quant_map is what its reader uses, so this only
  // touches --quantize nf4's absmax codes.
  static const std::vector<float> map = [] {
    std::vector<float> d;
    for (int i = 0; i < 7; ++i) {
      const int64_t steps = (int64_t(1) << i) + 1;
      const float start = 0.1f, end = 1.0f;
      const float step = (end - start) / float(steps - 1);
      std::vector<float> b(static_cast<size_t>(steps));
      for (int64_t k = 0; k < steps; ++k) {
        const float prod = k < steps / 2 ? step * float(k) : step * float(steps - 1 - k);
        b[size_t(k)] = k < steps / 2 ? start + prod : end - prod;
      }
      // Python's 10 ** (i - 6) is a double (an int for i = 6); torch multiplies a float32 tensor by it as float32.
      const float scale = float(std::pow(10.0, double(i - 6)));
      for (int64_t k = 0; k + 1 < steps; ++k) {
        const float mean = (b[size_t(k)] + b[size_t(k + 1)]) / 2.0f;
        d.push_back(scale * mean);
        d.push_back(-scale * mean);
      }
    }
    d.push_back(0.0f);
    d.push_back(1.0f);
    std::sort(d.begin(), d.end());
    return d;
  }();
  return map;
}

uint8_t dynamic_code(const std::vector<float>& code, float x) {
  // csrc/kernels.cu dQuantize<0>: seven halving steps from index 127 keep the last entry below x and the last
  // above it; the answer is the entry at the end of the walk or its neighbour on x's side, whichever is nearer
  // by a float32 midpoint (x exactly at the midpoint keeps the walk's entry).
  int at = 127, above = 255, below = 0;
  float lo = -1.0f, hi = 1.0f;
  float v = code[size_t(at)];
  for (int half = 64; half > 0; half >>= 1) {
    if (x > v) {
      below = at;
      lo = v;
      at += half;
    } else {
      above = at;
      hi = v;
      at -= half;
    }
    v = code[size_t(at)];
  }
  if (above == 255) hi = code[255];
  if (below == 0) lo = code[0];
  if (x > v) return uint8_t(x > (hi + v) * 0.5f ? above : at);
  return uint8_t(x < (lo + v) * 0.5f ? below : at);
}

float nf4_offset(const std::vector<float>& absmax) {
  double s = 0;
  for (float a : absmax) s += double(a);
  return float(s / double(absmax.size()));
}

namespace {

std::vector<float> floats_of(const Tensor& t) {
  std::vector<double> d = t.to_double();
  return std::vector<float>(d.begin(), d.end());  // exact: every stored dtype but f64 is a float32 subset
}

// kQuantizeBlockwise's scaling: max |x| per block, its float32 reciprocal, the float32 product.
template <class Code>
std::vector<float> blockwise(const std::vector<float>& x, int64_t blocksize, Code code_of, std::vector<uint8_t>& codes) {
  const int64_t n = int64_t(x.size()), blocks = (n + blocksize - 1) / blocksize;
  std::vector<float> absmax(static_cast<size_t>(blocks));
  codes.assign(size_t(n), 0);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * blocksize, i1 = std::min(n, i0 + blocksize);
    float m = 0.0f;  // the kernel starts at -FLT_MAX and pads short blocks with zeros: the same max for |x|
    for (int64_t i = i0; i < i1; ++i) m = std::fmax(m, std::fabs(x[size_t(i)]));
    absmax[size_t(b)] = m;
    const float inv = 1.0f / m;
    for (int64_t i = i0; i < i1; ++i) codes[size_t(i)] = code_of(x[size_t(i)] * inv);
  }
  return absmax;
}

}  // namespace

Nf4Weight quantize_nf4(const Tensor& w, int64_t blocksize, bool double_quant) {
  if (w.dtype == DType::f64) throw std::logic_error("quantize_nf4: bitsandbytes quantizes 16- and 32-bit floats only");
  Nf4Weight q;
  q.shape = w.shape;
  q.dtype = w.dtype;
  q.blocksize = blocksize;
  std::vector<uint8_t> codes;
  std::vector<float> absmax = blockwise(floats_of(w), blocksize, nf4_code, codes);
  q.packed.assign(size_t((codes.size() + 1) / 2), 0);
  for (size_t i = 0; i < codes.size(); ++i) q.packed[i / 2] |= uint8_t(i % 2 == 0 ? codes[i] << 4 : codes[i]);
  set_absmax(q, std::move(absmax), double_quant);
  return q;
}

void set_absmax(Nf4Weight& q, std::vector<float> absmax, bool double_quant) {
  q.nested = double_quant;
  if (!double_quant) {
    q.absmax = std::move(absmax);
    return;
  }
  q.absmax.clear();
  q.nested_offset = nf4_offset(absmax);
  for (float& a : absmax) a -= q.nested_offset;
  q.nested_quant_map = dynamic_map();
  q.nested_blocksize = kNestedBlocksize;
  const auto& map = q.nested_quant_map;
  q.nested_absmax = blockwise(absmax, q.nested_blocksize, [&](float x) { return dynamic_code(map, x); }, q.absmax_codes);
}

std::vector<float> nf4_absmax(const Nf4Weight& q) {
  if (!q.nested) return q.absmax;
  std::vector<float> a(q.absmax_codes.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const float decoded = q.nested_quant_map[q.absmax_codes[i]] * q.nested_absmax[i / size_t(q.nested_blocksize)];
    a[i] = decoded + q.nested_offset;
  }
  return a;
}

Tensor dequantize_nf4(const Nf4Weight& q) {
  const std::vector<float> absmax = nf4_absmax(q);
  OwnedTensor o = make_tensor(q.dtype, q.shape);
  const int64_t n = q.numel();
  for (int64_t i = 0; i < n; ++i) {
    const float v = kNF4[q.code(i)] * absmax[size_t(i / q.blocksize)];  // float32 product: one rounding
    switch (q.dtype) {
      case DType::bf16: o.data<uint16_t>()[i] = float_to_bf16(v); break;
      case DType::f16: o.data<uint16_t>()[i] = float_to_f16(v); break;
      case DType::f32: o.data<float>()[i] = v; break;
      case DType::f64: throw std::logic_error("dequantize_nf4: bitsandbytes dequantizes to 16- and 32-bit floats only");
    }
  }
  return o.t;
}

std::string BnbConfig::describe() const {
  std::string s = "bitsandbytes 4-bit nf4";
  if (!compute_dtype.empty()) s += ", compute dtype " + compute_dtype;
  if (!skip_modules.empty()) {
    s += ", llm_int8_skip_modules";
    for (const auto& m : skip_modules) s += " " + m;
  }
  return s;
}

std::optional<BnbConfig> parse_quantization_config(const json& v, const std::string& source,
                                                   std::vector<std::string>* warnings) {
  if (v.is_null()) return std::nullopt;
  const std::string key = "quantization_config";
  auto refuse = [&](const std::string& what) {
    fail(source, key + ": " + what + " is not implemented (implemented: null, or bitsandbytes 4-bit nf4 with uint8 storage)");
  };
  if (!v.is_object()) fail(source, key + " must be null or an object, got " + json_brief(v));
  auto get = [&](const char* k) -> const json* {
    auto it = v.find(k);
    return it == v.end() || it->is_null() ? nullptr : &*it;
  };
  auto flag = [&](const char* k, const char* older) {
    for (const char* name : {k, older}) {
      const json* f = get(name);
      if (!f) continue;
      if (!f->is_boolean()) fail(source, key + "." + name + " must be true or false, got " + json_brief(*f));
      if (f->get<bool>()) return true;
    }
    return false;
  };
  // transformers' AutoQuantizationConfig dispatches on quant_method; a config written before it existed has
  // load_in_4bit / load_in_8bit only, and is bitsandbytes'.
  const json* method = get("quant_method");
  if (method && !(method->is_string() && method->get<std::string>() == "bitsandbytes"))
    refuse("quant_method " + json_brief(*method));
  if (!method && !v.contains("load_in_4bit") && !v.contains("load_in_8bit"))
    refuse("a quantization_config without quant_method");
  if (flag("load_in_8bit", "_load_in_8bit")) refuse("bitsandbytes 8-bit (load_in_8bit, LLM.int8)");
  if (!flag("load_in_4bit", "_load_in_4bit")) refuse("bitsandbytes without load_in_4bit");
  // BitsAndBytesConfig's default bnb_4bit_quant_type is "fp4": a config that does not say nf4 is fp4.
  const json* type = get("bnb_4bit_quant_type");
  if (!type) refuse("bnb_4bit_quant_type absent (transformers' default, fp4)");
  if (!(type->is_string() && type->get<std::string>() == "nf4")) refuse("bnb_4bit_quant_type " + json_brief(*type));
  if (const json* s = get("bnb_4bit_quant_storage"); s && !(s->is_string() && s->get<std::string>() == "uint8"))
    refuse("bnb_4bit_quant_storage " + json_brief(*s) + " (packed codes in another dtype's bytes)");
  BnbConfig q;
  if (const json* d = get("bnb_4bit_use_double_quant")) {
    if (!d->is_boolean()) fail(source, key + ".bnb_4bit_use_double_quant must be true or false, got " + json_brief(*d));
    q.double_quant = d->get<bool>();
  }
  if (const json* d = get("bnb_4bit_compute_dtype")) {
    const std::string s = d->is_string() ? d->get<std::string>() : "";
    if (s != "bfloat16" && s != "float16" && s != "float32")
      fail(source, key + ".bnb_4bit_compute_dtype must be bfloat16, float16 or float32, got " + json_brief(*d));
    q.compute_dtype = s;
  }
  if (const json* m = get("llm_int8_skip_modules")) {
    if (!m->is_array()) fail(source, key + ".llm_int8_skip_modules must be a list of module names, got " + json_brief(*m));
    for (const auto& e : *m) {
      if (!e.is_string()) fail(source, key + ".llm_int8_skip_modules entries must be strings, got " + json_brief(e));
      q.skip_modules.push_back(e.get<std::string>());
    }
  }
  // The LLM.int8 settings do nothing to 4-bit layers; anything else is news.
  static const char* known[] = {"quant_method", "load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit",
                                "bnb_4bit_quant_type", "bnb_4bit_quant_storage", "bnb_4bit_use_double_quant",
                                "bnb_4bit_compute_dtype", "llm_int8_skip_modules", "llm_int8_threshold",
                                "llm_int8_has_fp16_weight", "llm_int8_enable_fp32_cpu_offload"};
  for (const auto& item : v.items()) {
    // A named copy, not a structured binding: clang 14 (the fuzz build) cannot capture those in a lambda.
    const std::string k = item.key();
    if (std::find_if(std::begin(known), std::end(known), [&](const char* n) { return k == n; }) == std::end(known) &&
        warnings)
      warnings->push_back(one_line(source + ": " + key + " key '" + k + "' is not a BitsAndBytesConfig key this project knows: ignored"));
  }
  return q;
}

bool bnb_skips(const std::vector<std::string>& skip, int64_t layer, Proj p) {
  const std::string leaf = proj_name(p);
  const std::string path = "model.layers." + std::to_string(layer) + "." + proj_module(p);
  for (const auto& k : skip)
    if (k == leaf || k == path || path.find(k + ".") != std::string::npos) return true;
  return false;
}

namespace {

// "model.layers.12.mlp.up_proj.weight" (or without "model."): 12; -1 for a name outside the layers.
int64_t layer_number(const std::string& name) {
  size_t i = name.rfind("model.", 0) == 0 ? 6 : 0;
  if (name.compare(i, 7, "layers.") != 0) return -1;
  i += 7;
  size_t j = i;
  while (j < name.size() && j - i < 7 && name[j] >= '0' && name[j] <= '9') ++j;
  if (j == i || j - i > 6 || j >= name.size() || name[j] != '.') return -1;
  return std::stoll(name.substr(i, j - i));
}

const char* kStateKeys[] = {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                            "quant_state.bitsandbytes__fp4"};

// One projection's packed weight and quant state, read and checked (QuantState.from_dict's fields).
Nf4Weight read_nf4_weight(const std::string& w, TensorMap& weights, ByteTensorMap& bytes, const Shape& shape,
                          const std::string& source) {
  auto name = [&](const char* k) { return w + "." + k; };
  auto where = [&](const std::string& t) { return "tensor '" + t + "'"; };
  if (bytes.count(name("quant_state.bitsandbytes__fp4")) || weights.count(name("quant_state.bitsandbytes__fp4")))
    fail(source, where(name("quant_state.bitsandbytes__fp4")) + ": bitsandbytes fp4 is not implemented (nf4 only)");
  auto byte_tensor = [&](const std::string& t) -> const ByteTensor& {
    auto it = bytes.find(t);
    if (it != bytes.end()) return it->second;
    if (auto f = weights.find(t); f != weights.end())
      fail(source, where(t) + " has dtype " + dtype_name(f->second.dtype) + "; bitsandbytes stores it as U8");
    fail(source, "missing " + where(t) + " (the bitsandbytes quant state of '" + w + "')");
  };
  auto float_tensor = [&](const std::string& t, int64_t n) {
    auto it = weights.find(t);
    if (it == weights.end()) {
      if (bytes.count(t)) fail(source, where(t) + " has dtype U8; bitsandbytes stores it as F32");
      fail(source, "missing " + where(t) + " (the bitsandbytes quant state of '" + w + "')");
    }
    if (it->second.dtype != DType::f32)
      fail(source, where(t) + " has dtype " + dtype_name(it->second.dtype) + "; bitsandbytes stores it as F32");
    if (it->second.shape != Shape{n})
      fail(source, where(t) + " has shape " + shape_str(it->second.shape) + ", expected " + shape_str({n}));
    std::vector<float> v = floats_of(it->second);
    for (size_t i = 0; i < v.size(); ++i)
      if (!std::isfinite(v[i])) fail(source, where(t) + " has a non-finite value at index " + std::to_string(i));
    return v;
  };

  // The packed JSON of the non-tensor fields (QuantState.as_dict(packed=True): utils.py pack_dict_to_tensor).
  const std::string qs_name = name("quant_state.bitsandbytes__nf4");
  const ByteTensor& qs = byte_tensor(qs_name);
  if (qs.shape.size() != 1) fail(source, where(qs_name) + " has shape " + shape_str(qs.shape) + ", expected one dimension");
  json st;
  try {
    st = parse_json(std::string(reinterpret_cast<const char*>(qs.bytes.get()), size_t(qs.numel())));
  } catch (const json::exception& e) {
    fail(source, where(qs_name) + " is not the JSON of a quant state: " + e.what());
  }
  if (!st.is_object()) fail(source, where(qs_name) + " is not a JSON object");
  static const char* fields[] = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"};
  for (const auto& item : st.items()) {
    const std::string k = item.key();  // not a structured binding: see parse_quantization_config
    if (std::find_if(std::begin(fields), std::end(fields), [&](const char* f) { return k == f; }) == std::end(fields))
      fail(source, where(qs_name) + " has key '" + k + "', which bitsandbytes' QuantState does not know");
  }
  auto field = [&](const char* k) -> const json& {
    if (!st.contains(k)) fail(source, where(qs_name) + " lacks '" + k + "'");
    return st[k];
  };
  if (field("quant_type") != "nf4")
    fail(source, where(qs_name) + ": quant_type " + json_brief(st["quant_type"]) + " is not nf4");
  Nf4Weight q;
  q.shape = shape;
  auto blocksize = [&](const char* k, std::initializer_list<int64_t> ok) {
    const json& b = field(k);
    if (b.is_number_integer())
      for (int64_t v : ok)
        if (b.get<int64_t>() == v) return v;
    fail(source, where(qs_name) + ": " + k + " " + json_brief(b) + " is not one bitsandbytes dequantizes");
  };
  q.blocksize = blocksize("blocksize", {32, 64, 128, 256, 512, 1024, 2048, 4096});
  const json& dt = field("dtype");
  if (dt == "bfloat16") q.dtype = DType::bf16;
  else if (dt == "float16") q.dtype = DType::f16;
  else if (dt == "float32") q.dtype = DType::f32;
  else fail(source, where(qs_name) + ": dtype " + json_brief(dt) + " is not bfloat16, float16 or float32");
  const json& sh = field("shape");
  if (sh != json(shape))
    fail(source, where(qs_name) + ": shape " + json_brief(sh) + " is not " + shape_str(shape) + ", the config's for '" + w + "'");

  const int64_t n = q.numel();
  const ByteTensor& packed = byte_tensor(w);
  if (packed.shape != Shape{(n + 1) / 2, 1})
    fail(source, where(w) + " has shape " + shape_str(packed.shape) + "; " + shape_str(shape) +
                     " packed two codes a byte is " + shape_str({(n + 1) / 2, 1}));
  q.packed.assign(reinterpret_cast<const uint8_t*>(packed.bytes.get()),
                  reinterpret_cast<const uint8_t*>(packed.bytes.get()) + (n + 1) / 2);

  // dequantize_4bit ignores quant_map (the kernel has the code book built in); a map other than NF4's is a file
  // made for something else.
  const std::vector<float> map = float_tensor(name("quant_map"), 16);
  for (int c = 0; c < 16; ++c)
    if (float_bits(map[size_t(c)]) != float_bits(kNF4[size_t(c)])) {
      char msg[120];
      std::snprintf(msg, sizeof msg, " entry %d is %.9g, not NF4's %.9g", c, double(map[size_t(c)]), double(kNF4[size_t(c)]));
      fail(source, where(name("quant_map")) + msg);
    }

  const int64_t blocks = q.blocks();
  q.nested = st.contains("nested_offset") || st.contains("nested_blocksize") || st.contains("nested_dtype");
  const bool nested_tensors = bytes.count(name("nested_absmax")) || weights.count(name("nested_absmax")) ||
                              bytes.count(name("nested_quant_map")) || weights.count(name("nested_quant_map"));
  if (q.nested != nested_tensors)
    fail(source, where(qs_name) + (q.nested ? " describes double quantization but the nested tensors are missing"
                                           : " has no nested fields but nested_absmax or nested_quant_map is there"));
  if (!q.nested) {
    q.absmax = float_tensor(name("absmax"), blocks);
    return q;
  }
  q.nested_blocksize = blocksize("nested_blocksize", {64, 128, 256, 512, 1024, 2048, 4096});
  if (field("nested_dtype") != "float32")
    fail(source, where(qs_name) + ": nested_dtype " + json_brief(st["nested_dtype"]) + " is not float32 (the absmax' dtype)");
  const json& off = field("nested_offset");
  if (!off.is_number() || !std::isfinite(off.get<double>()))
    fail(source, where(qs_name) + ": nested_offset " + json_brief(off) + " is not a finite number");
  q.nested_offset = float(off.get<double>());  // from_dict: torch.tensor(float(...)), float32
  const ByteTensor& codes = byte_tensor(name("absmax"));
  if (codes.shape != Shape{blocks})
    fail(source, where(name("absmax")) + " has shape " + shape_str(codes.shape) + "; " + std::to_string(n) +
                     " weights in blocks of " + std::to_string(q.blocksize) + " have " + std::to_string(blocks) + " absmax");
  q.absmax_codes.assign(reinterpret_cast<const uint8_t*>(codes.bytes.get()),
                        reinterpret_cast<const uint8_t*>(codes.bytes.get()) + blocks);
  q.nested_absmax = float_tensor(name("nested_absmax"), (blocks + q.nested_blocksize - 1) / q.nested_blocksize);
  q.nested_quant_map = float_tensor(name("nested_quant_map"), 256);
  return q;
}

}  // namespace

void dequantize_bnb_checkpoint(TensorMap& weights, ByteTensorMap& bytes, const Config& c, const BnbConfig& q,
                               const std::string& source, bool allow_deeper, std::map<std::string, Nf4Weight>* forms) {
  auto too_deep = [&](const std::string& n) { return layer_number(n) >= c.num_hidden_layers; };
  if (allow_deeper) {
    std::erase_if(weights, [&](const auto& e) { return too_deep(e.first); });
    std::erase_if(bytes, [&](const auto& e) { return too_deep(e.first); });
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (Proj p : kAllProj) {
      const std::string w = proj_weight_name(l, p);
      const Shape shape{proj_out(c, p), proj_in(c, p)};
      const bool skipped = bnb_skips(q.skip_modules, l, p);
      if (!bytes.count(w)) {
        // A checkpoint with a quantization_config is pre-quantized to transformers, which then refuses a float
        // weight of a Linear4bit: "Supplied state dict for ... does not contain `bitsandbytes__*`"
        // (Bnb4BitHfQuantizer.create_quantized_param, 4.x; read from the source). Quantizing it here instead ran a
        // model HF would not load.
        if (skipped || !weights.count(w)) continue;  // a missing weight is validate_checkpoint's to name
        fail(source, "tensor '" + w + "' is stored as floats although quantization_config quantizes its module "
                     "(no llm_int8_skip_modules entry exempts it); transformers refuses such a checkpoint ('does not "
                     "contain bitsandbytes__*'): store it packed, or list the module in llm_int8_skip_modules");
      }
      if (skipped)
        fail(source, "tensor '" + w + "' is packed 4-bit but quantization_config.llm_int8_skip_modules keeps its module unquantized");
      if (weights.count(w)) fail(source, "tensor '" + w + "' appears twice (packed and as floats)");
      Nf4Weight form = read_nf4_weight(w, weights, bytes, shape, source);
      const Tensor dq = dequantize_nf4(form);
      if (forms) (*forms)[proj_weight_name(l, p)] = std::move(form);
      bytes.erase(w);
      for (const char* k : kStateKeys) {
        bytes.erase(w + "." + k);
        weights.erase(w + "." + k);
      }
      weights.emplace(w, dq);
    }
  for (const auto& [n, t] : bytes) {
    if (too_deep(n))
      fail(source, "tensor '" + n + "' is of layer " + std::to_string(layer_number(n)) + ": the config has " +
                       std::to_string(c.num_hidden_layers) + " layers (num_hidden_layers)");
    fail(source, "tensor '" + n + "' has dtype U8 and is no part of a bitsandbytes 4-bit projection weight of this config");
  }
}

std::string quantize_base_projections(Checkpoint& ck) {
  if (ck.quantization) fail("--quantize", "the checkpoint's base is already quantized (" + *ck.quantization + ")");
  int64_t n = 0;
  for (int64_t l = 0; l < ck.config.num_hidden_layers; ++l)
    for (Proj p : kAllProj) {
      const std::string w = proj_weight_name(l, p);
      auto it = ck.weights.find(w);
      if (it == ck.weights.end()) throw std::logic_error("quantize_base_projections: no " + w);
      if (it->second.dtype == DType::f64)
        fail("--quantize", "tensor '" + w + "' is float64; bitsandbytes quantizes 16- and 32-bit floats only");
      Nf4Weight form = quantize_nf4(it->second, kNF4Blocksize, true);
      it->second = dequantize_nf4(form);
      ck.nf4[w] = std::move(form);
      ++n;
    }
  ck.quantization = "bitsandbytes nf4 (blocksize 64, double quantization), quantized here";
  return std::to_string(n) + " base projection weights NF4-quantized as QLoRA does (bitsandbytes nf4, blocksize " +
         std::to_string(kNF4Blocksize) + ", double quantization of the absmax in blocks of " +
         std::to_string(kNestedBlocksize) + ") and replaced by their dequantized values";
}

}  // namespace gemma
