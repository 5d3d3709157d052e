#include "check/golden.hpp"

#include "model/atomic_file.hpp"

#include <openssl/evp.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/errors.hpp"
#include "model/h5util.hpp"
#include "model/safetensors.hpp"
#include "model/synthetic.hpp"

namespace gemma::check {

using nlohmann::json;
namespace fs = std::filesystem;

std::string GoldenRecipe::file_name() const {
  return model + (lora_r > 0 ? "_lora" + std::to_string(lora_r) : "_full") + "_" + softcap_combo(softcap) + ".h5";
}

InputSpec GoldenRecipe::input_spec() const {
  InputSpec s;
  s.model = model;
  s.layers = layers;
  s.batch = batch;
  s.seq = seq;
  s.seed = seed;
  s.lora_r = lora_r;
  return s;
}

namespace {

// verify's defaults for a synthetic run of a preset (check/inputs.cpp).
GoldenRecipe defaults(const std::string& model, int64_t lora_r, Softcap sc) {
  const PresetShape p = preset_shape(model);
  return {model, p.layers, p.batch, p.seq, lora_r, 0, sc};
}

}  // namespace

std::vector<GoldenRecipe> standard_goldens() {
  std::vector<GoldenRecipe> r;
  for (Softcap sc : all_softcaps()) {
    for (const char* m : {"gemma2-2b", "gemma2-9b", "gemma2-27b", "gemma2-tiny", "gemma2-micro", "gemma2-odd"})
      r.push_back(defaults(m, 8, sc));
    for (const char* m : {"gemma2-tiny", "gemma2-micro"}) r.push_back(defaults(m, 0, sc));
  }
  return r;
}

std::optional<GoldenRecipe> recipe_of(const InputSpec& spec, Softcap sc) {
  if (!spec.model || !is_preset(*spec.model)) return std::nullopt;
  if (spec.quantize) return std::nullopt;  // goldens are of the unquantized synthetic weights
  GoldenRecipe d = defaults(*spec.model, spec.lora_r.value_or(kDefaultPresetLoraR), sc);
  d.layers = spec.layers.value_or(d.layers);
  d.batch = spec.batch.value_or(d.batch);
  d.seq = spec.seq.value_or(d.seq);
  d.seed = spec.seed;
  return d;
}

Sketch sketch_of(const std::string& name, const std::vector<double>& g) {
  Sketch s;
  s.proj.assign(kSketchSize, 0.0);
  double sq = 0;
  for (double v : g) sq += v * v;
  s.norm = std::sqrt(sq);
  for (int k = 0; k < kSketchSize; ++k) {
    const uint64_t key = stream_key(uint64_t(k), "sketch:" + name);
    double acc = 0;
    for (size_t i = 0; i < g.size(); ++i) acc += stream_uniform(key, i) < 0 ? -g[i] : g[i];
    s.proj[size_t(k)] = acc;
  }
  return s;
}

Golden golden_from(const GoldenRecipe& recipe, const Batch& batch, int64_t vocab, const ref::Output& out) {
  Golden g;
  g.recipe = recipe;
  g.loss = out.loss;
  g.tokens = out.tokens;
  const int64_t N = batch.B * batch.T;
  // First, middle and last rows; every column of a small vocabulary, every 64th of a large one, plus each
  // row's target (the column the loss reads).
  g.logit_rows = {0, N / 2, N - 1};
  const int64_t stride = vocab <= 4096 ? 1 : 64;
  for (int64_t j = 0; j < vocab; j += stride) g.logit_cols.push_back(j);
  for (int64_t n : g.logit_rows) {
    const int64_t y = batch.target(n / batch.T, n % batch.T);
    if (y >= 0 && y % stride != 0) g.logit_cols.push_back(y);
  }
  for (int64_t n : g.logit_rows)
    for (int64_t j : g.logit_cols) g.logits.push_back(out.logits[size_t(n * vocab + j)]);
  for (const auto& [name, t] : out.grads) {
    const std::vector<double> v = t.to_double();
    if (t.numel() <= kStoreWhole) g.grads[name] = v;
    else g.sketches[name] = sketch_of(name, v);
  }
  return g;
}

void write_golden(const std::string& path, const Golden& g) {
  h5::write_atomically(path, [&](H5::H5File& f) {
    json r = {{"model", g.recipe.model}, {"layers", g.recipe.layers}, {"batch", g.recipe.batch}, {"seq", g.recipe.seq},
              {"lora_r", g.recipe.lora_r}, {"seed", g.recipe.seed}, {"softcap", softcap_name(g.recipe.softcap)}};
    h5::write_string_attr(f, "recipe_json", r.dump());
    for (const auto& [k, v] : g.provenance) h5::write_string_attr(f, k, v);
    H5::Group root = f.openGroup("/");
    h5::write_scalar(root, "loss", g.loss);
    h5::write_ints(root, "tokens", {}, {g.tokens});
    H5::Group lg = f.createGroup("logits");
    h5::write_ints(lg, "rows", {int64_t(g.logit_rows.size())}, g.logit_rows);
    h5::write_ints(lg, "cols", {int64_t(g.logit_cols.size())}, g.logit_cols);
    h5::write_doubles(lg, "values", {int64_t(g.logit_rows.size()), int64_t(g.logit_cols.size())}, g.logits.data());
    H5::Group gg = f.createGroup("grads");
    for (const auto& [n, v] : g.grads) h5::write_doubles(gg, n, {int64_t(v.size())}, v.data());
    H5::Group sg = f.createGroup("sketches");
    for (const auto& [n, s] : g.sketches) {
      std::vector<double> v = {s.norm};
      v.insert(v.end(), s.proj.begin(), s.proj.end());
      h5::write_doubles(sg, n, {int64_t(v.size())}, v.data());
    }
  });
}

Golden read_golden(const std::string& path) {
  h5::quiet();
  std::error_code ec;
  if (!fs::exists(path, ec)) fail(path, "no such golden file");
  Golden g;
  h5::guard(path, "reading golden", [&] {
    if (!H5::H5File::isHdf5(path)) fail(path, "not an HDF5 file");
    H5::H5File f(path, H5F_ACC_RDONLY);
    json r;
    try {
      r = json::parse(h5::read_string_attr(f, "recipe_json", path));
      g.recipe = {r.at("model").get<std::string>(), r.at("layers").get<int64_t>(), r.at("batch").get<int64_t>(),
                  r.at("seq").get<int64_t>(),       r.at("lora_r").get<int64_t>(), r.at("seed").get<uint64_t>(),
                  parse_softcap(r.at("softcap").get<std::string>(), path)};
    } catch (const json::exception& e) {
      fail(path, std::string("recipe_json: ") + e.what());
    }
    const int na = f.getNumAttrs();
    for (int i = 0; i < na; ++i) {
      H5::Attribute a = f.openAttribute(unsigned(i));
      if (a.getName() != "recipe_json" && a.getTypeClass() == H5T_STRING)
        g.provenance[a.getName()] = h5::read_string_attr(f, a.getName(), path);
    }
    g.loss = h5::read_scalar(f, "loss", path);
    Shape s;
    g.tokens = h5::read_int_dataset(f, "tokens", path, s).at(0);
    H5::Group lg = f.openGroup("logits");
    g.logit_rows = h5::read_int_dataset(lg, "rows", path, s);
    g.logit_cols = h5::read_int_dataset(lg, "cols", path, s);
    g.logits = h5::read_float_tensor(lg, "values", path).to_double();
    if (g.logits.size() != g.logit_rows.size() * g.logit_cols.size()) fail(path, "logits/values does not match rows x cols");
    H5::Group gg = f.openGroup("grads");
    for (const auto& n : h5::children(gg)) g.grads[n] = h5::read_float_tensor(gg, n, path).to_double();
    H5::Group sg = f.openGroup("sketches");
    for (const auto& n : h5::children(sg)) {
      const std::vector<double> v = h5::read_float_tensor(sg, n, path).to_double();
      if (v.size() != size_t(kSketchSize + 1)) fail(path, "sketch of '" + n + "' has the wrong length");
      g.sketches[n] = {v[0], std::vector<double>(v.begin() + 1, v.end())};
    }
    return 0;
  });
  return g;
}

void compare_golden(Report& r, const std::string& prefix, const Golden& e, const Golden& a, const GoldenTolerances& tol) {
  r.add(prefix + "golden loss (rel)", rel_err(a.loss, e.loss), tol.loss, tol.why);
  if (a.tokens != e.tokens)
    r.add(prefix + "golden scored targets", double(std::llabs(a.tokens - e.tokens)), 0, "the batch must be the golden's");
  {
    double num = 0, den = 0;
    for (size_t i = 0; i < e.logits.size() && i < a.logits.size(); ++i) {
      num = std::max(num, std::fabs(a.logits[i] - e.logits[i]));
      den = std::max(den, std::fabs(e.logits[i]));
    }
    const bool same_shape = a.logits.size() == e.logits.size();
    r.add(prefix + "golden logits, " + std::to_string(e.logit_rows.size()) + " rows (max rel)",
          same_shape ? num / den : std::nan(""), tol.logits, tol.why);
  }
  for (const auto& [n, v] : e.grads) {
    auto it = a.grads.find(n);
    double num = 0, den = 0;
    if (it != a.grads.end() && it->second.size() == v.size())
      for (size_t i = 0; i < v.size(); ++i) {
        num += (it->second[i] - v[i]) * (it->second[i] - v[i]);
        den += v[i] * v[i];
      }
    const double err = it == a.grads.end() || it->second.size() != v.size() ? std::nan("") : std::sqrt(num / den);
    r.add(prefix + "golden grad " + n + " (rel L2)", err, tol.grads, tol.why);
  }
  for (const auto& [n, s] : e.sketches) {
    auto it = a.sketches.find(n);
    double err = std::nan("");
    if (it != a.sketches.end()) {
      double num = 0, den = 0;
      for (int k = 0; k < kSketchSize; ++k) {
        num += (it->second.proj[size_t(k)] - s.proj[size_t(k)]) * (it->second.proj[size_t(k)] - s.proj[size_t(k)]);
        den += s.proj[size_t(k)] * s.proj[size_t(k)];
      }
      err = std::max(rel_err(it->second.norm, s.norm), std::sqrt(num / den));
    }
    r.add(prefix + "golden grad " + n + " (sketch rel)", err, tol.grads, tol.why);
  }
}

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open to hash");
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 16);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    EVP_DigestUpdate(ctx, buf.data(), size_t(in.gcount()));
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, md, &len);
  EVP_MD_CTX_free(ctx);
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < len; ++i) {
    s += hex[md[i] >> 4];
    s += hex[md[i] & 15];
  }
  return s;
}

namespace {

json read_manifest() {
  std::error_code ec;
  if (!fs::exists(kManifest, ec)) return json{{"files", json::object()}};
  try {
    json m = json::parse(read_text_file(kManifest));
    if (!m.contains("files") || !m["files"].is_object()) fail(kManifest, "missing object 'files'");
    return m;
  } catch (const json::exception& e) {
    fail(kManifest, std::string("malformed JSON: ") + e.what());
  }
}

}  // namespace

void check_manifest(const std::string& path) {
  const json m = read_manifest();
  const std::string rel = fs::path(path).lexically_normal().string();
  auto it = m["files"].find(rel);
  if (it == m["files"].end()) fail(path, "golden is not listed in " + std::string(kManifest));
  const std::string want = it->value("sha256", "");
  const std::string have = sha256_file(path);
  if (want != have)
    fail(path, "sha256 " + have + " does not match " + std::string(kManifest) + " (" + want +
                   "): the golden was modified or is corrupt; regenerate it with tools/make-goldens");
}

void record_in_manifest(const std::string& path, const std::map<std::string, std::string>& provenance) {
  json m = read_manifest();
  json e = json::object();
  for (const auto& [k, v] : provenance) e[k] = v;
  e["sha256"] = sha256_file(path);
  e["bytes"] = uint64_t(fs::file_size(path));
  m["files"][fs::path(path).lexically_normal().string()] = e;
  write_text_file_atomically(kManifest, m.dump(2) + "\n");
}

}  // namespace gemma::check
