#include "safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>
#include <vector>
#include <sstream>

#include "errors.hpp"
#include "atomic_file.hpp"
#include "nf4.hpp"
#include "json_text.hpp"

namespace gemma {

using nlohmann::json;
namespace fs = std::filesystem;

std::string read_text_file(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) fail(path, "no such file");
  if (fs::is_directory(path, ec)) fail(path, "is a directory, expected a file");
  // /dev/zero or a FIFO would be read forever; configs and shard indexes are kilobytes.
  if (!fs::is_regular_file(path, ec)) fail(path, "is not a regular file");
  const uint64_t size = fs::file_size(path, ec);
  if (!ec && size > (uint64_t(64) << 20))
    fail(path, "is " + std::to_string(size) + " bytes; a JSON config or index is at most a few megabytes");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail(path, "read error");
  return ss.str();
}

namespace {

// A read-only mapping of a whole file, unmapped when the last tensor aliasing it is gone.
std::shared_ptr<const std::byte> map_file(const std::string& path, size_t& size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  size = size_t(st.st_size);
  if (size == 0) {
    ::close(fd);
    fail(path, "empty file, not a safetensors file");
  }
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) fail(path, std::string("cannot map: ") + std::strerror(errno));
  const size_t len = size;
  return std::shared_ptr<const std::byte>(static_cast<const std::byte*>(p),
                                          [len](const std::byte* q) { ::munmap(const_cast<std::byte*>(q), len); });
}

// Refuses a key given twice, where nlohmann would silently keep the last one: a tensor name at the top level, and a
// field (dtype, shape, data_offsets) within one tensor's entry, which the safetensors library's TensorInfo (a serde
// struct) refuses as a duplicate field (found by a probe, 2026-12-06: a bf16 tensor whose entry ended with a second
// "dtype": "F16" was read as F16). __metadata__ is a map of strings, which serde reads last-wins; it is left alone.
json parse_header(const std::string& text, const std::string& path) {
  std::set<std::string> seen, fields;
  std::string tensor;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::key && depth == 1) {
      tensor = parsed.get<std::string>();
      if (!seen.insert(tensor).second) fail(path, "tensor '" + tensor + "' appears twice in the header");
      fields.clear();
    } else if (ev == json::parse_event_t::key && depth == 2 && tensor != "__metadata__") {
      const std::string f = parsed.get<std::string>();
      if (!fields.insert(f).second) fail(path, "tensor '" + tensor + "' has '" + f + "' twice in its header entry");
    }
    return true;
  };
  try {
    return parse_json(text, cb);
  } catch (const json::exception& e) {
    fail(path, std::string("header is not valid JSON: ") + e.what());
  }
}

}  // namespace

TensorMap read_safetensors(const std::string& path, ByteTensorMap* u8) {
  std::error_code ec;
  if (!fs::exists(path, ec)) fail(path, "no such file");
  size_t size = 0;
  auto base = map_file(path, size);
  if (size < 8) fail(path, "file of " + std::to_string(size) + " bytes is too short for a safetensors header");
  uint64_t n = 0;
  std::memcpy(&n, base.get(), 8);  // little-endian u64, as the format says
  // PyTorch's own formats, which HF and PEFT also save (pytorch_model.bin, adapter_model.bin): a zip archive
  // (torch.save since 1.6) or a bare pickle. Where the header length is impossible anyway, such a file is named as
  // what it is rather than as a safetensors header gone wrong.
  const auto* b = reinterpret_cast<const unsigned char*>(base.get());
  const bool torch_file = (b[0] == 'P' && b[1] == 'K' && b[2] == 3 && b[3] == 4) || (b[0] == 0x80 && b[1] >= 2 && b[1] <= 5);
  constexpr uint64_t kMaxHeaderBytes = 100u * 1024 * 1024;
  if (torch_file && (n > kMaxHeaderBytes || n > size - 8))
    fail(path, "is a PyTorch pickle/zip file (torch.save), not safetensors: only safetensors is read (convert it "
               "with safetensors.torch.save_file)");
  if (n > kMaxHeaderBytes) fail(path, "header length " + std::to_string(n) + " is absurdly large (> 100 MiB)");
  if (n > size - 8)
    fail(path, "header length " + std::to_string(n) + " runs beyond the end of the file (" + std::to_string(size) + " bytes)");
  const std::string text(reinterpret_cast<const char*>(base.get()) + 8, size_t(n));
  // nlohmann's parser skips a byte order mark; the safetensors library (serde_json) refuses the file, which HF could
  // then not load.
  if (text.rfind("\xEF\xBB\xBF", 0) == 0)
    fail(path, "header starts with a UTF-8 byte order mark (EF BB BF), which the safetensors library refuses");
  json h = parse_header(text, path);
  if (!h.is_object()) fail(path, "header is not a JSON object");
  const uint64_t data_size = size - 8 - n;
  const std::byte* data = base.get() + 8 + n;

  TensorMap out;
  struct Span {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Span> spans;
  for (auto& [name, e] : h.items()) {
    if (name == "__metadata__") {
      // The safetensors library reads it as a map of strings to strings and refuses the file otherwise.
      if (!e.is_object()) fail(path, "__metadata__ is not an object");
      for (auto& [k, v] : e.items())
        if (!v.is_string()) fail(path, "__metadata__ entry '" + k + "' is not a string (the format allows only strings)");
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!e.is_object()) fail(path, where + " has a header entry that is not an object");
    auto dt = e.find("dtype");
    auto sh = e.find("shape");
    auto off = e.find("data_offsets");
    if (dt == e.end() || sh == e.end() || off == e.end())
      fail(path, where + " lacks one of dtype, shape, data_offsets");
    if (!dt->is_string()) fail(path, where + " has a dtype that is not a string");
    const std::string dts = dt->get<std::string>();
    DType d = DType::f32;
    const bool bytes = dts == "U8";
    if (dts == "BF16") d = DType::bf16;
    else if (dts == "F16") d = DType::f16;
    else if (dts == "F32") d = DType::f32;
    else if (dts == "F64") d = DType::f64;
    else if (bytes && !u8)
      fail(path, where + " has dtype U8 (bitsandbytes' packed 4-bit weights and quant state are), but config.json has "
                         "no quantization_config; only BF16, F16, F32, F64 are weights");
    else if (!bytes) fail(path, where + " has dtype " + dts + "; only BF16, F16, F32, F64 are weights");
    if (!sh->is_array() || sh->size() > 8) fail(path, where + " has a shape that is not a list of at most 8 sizes");
    Shape shape;
    uint64_t numel = 1;
    for (const auto& s : *sh) {
      if (!s.is_number_integer() || s.get<int64_t>() < 0) fail(path, where + " has a negative or non-integer size in its shape");
      const uint64_t v = s.get<uint64_t>();
      if (v != 0 && numel > (uint64_t(1) << 40) / v) fail(path, where + " has an absurdly large shape");
      numel *= v;
      shape.push_back(int64_t(v));
    }
    if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
      fail(path, where + " data_offsets must be two non-negative integers");
    const uint64_t b = (*off)[0].get<uint64_t>(), en = (*off)[1].get<uint64_t>();
    if (b > en || en > data_size)
      fail(path, where + " data_offsets [" + std::to_string(b) + ", " + std::to_string(en) + "] fall outside the " +
                     std::to_string(data_size) + " data bytes");
    const uint64_t element = bytes ? 1 : dtype_size(d);
    if (en - b != numel * element)
      fail(path, where + " has " + std::to_string(en - b) + " data bytes, its shape " + shape_str(shape) + " and dtype " +
                     dts + " need " + std::to_string(numel * element));
    spans.push_back({b, en, name});
    if (bytes) {
      u8->emplace(name, ByteTensor{std::move(shape), std::shared_ptr<const std::byte>(base, data + b)});
      continue;
    }
    Tensor t;
    t.dtype = d;
    t.shape = std::move(shape);
    t.bytes = std::shared_ptr<const std::byte>(base, data + b);
    out.emplace(name, std::move(t));
  }
  // The tensors must tile the data exactly, in offset order: the safetensors library refuses a file where one starts
  // before the previous one ends or after it (Metadata::validate, "invalid offset") or whose data runs on past the last
  // (MetadataIncompleteBuffer). Two tensors sharing bytes would otherwise alias, and HF could not load the file at all.
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& c) { return std::tie(a.begin, a.end) < std::tie(c.begin, c.end); });
  auto offs = [](const Span& sp) {
    return "tensor '" + sp.name + "' data_offsets [" + std::to_string(sp.begin) + ", " + std::to_string(sp.end) + "]";
  };
  // Overlaps first: a tensor pointed at another's bytes also leaves its own unused, and the overlap is the cause.
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end)
      fail(path, offs(spans[i]) + " overlap those of tensor '" + spans[i - 1].name +
                     "' (the format requires each tensor to start where the previous one ends)");
  uint64_t at = 0;
  for (const Span& sp : spans) {
    if (sp.begin > at)
      fail(path, offs(sp) + " leave the " + std::to_string(sp.begin - at) + " bytes before it unused (the format " +
                     "requires each tensor to start where the previous one ends)");
    at = sp.end;
  }
  if (at != data_size)
    fail(path, std::to_string(data_size - at) + " bytes after the last tensor's data (the format requires the tensors to "
                                                "cover the data exactly)");
  return out;
}

namespace {

// model.safetensors.index.json: its weight_map names, for each tensor, the shard (beside the index) holding it.
TensorMap read_safetensors_index(const std::string& ip, ByteTensorMap* u8) {
  const fs::path dir = fs::path(ip).parent_path();
  json idx;
  try {
    idx = parse_json(read_text_file(ip));
  } catch (const json::exception& e) {
    fail(ip, std::string("malformed JSON: ") + e.what());
  }
  if (!idx.is_object() || !idx.contains("weight_map") || !idx["weight_map"].is_object())
    fail(ip, "missing object 'weight_map'");
  std::map<std::string, std::set<std::string>> by_file;
  std::map<std::string, std::string> file_of;
  for (auto& [name, file] : idx["weight_map"].items()) {
    if (!file.is_string()) fail(ip, "weight_map entry for '" + name + "' is not a file name");
    const std::string f = file.get<std::string>();
    if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
      fail(ip, "shard name '" + f + "' must be a plain file name in the same directory");
    by_file[f].insert(name);
    file_of[name] = f;
  }
  const std::string index_name = fs::path(ip).filename().string();
  // A tensor found in a shard the index does not place it in: say where the index does place it, if anywhere.
  auto unlisted = [&](const std::string& shard_path, const std::string& n) {
    auto it = file_of.find(n);
    if (it == file_of.end()) fail(shard_path, "tensor '" + n + "' is not listed in " + index_name);
    fail(shard_path, "tensor '" + n + "' is in this shard, but " + index_name + " places it in '" + it->second + "'");
  };
  TensorMap all;
  for (const auto& [f, names] : by_file) {
    const std::string sp = (dir / f).string();
    ByteTensorMap shard_u8;
    TensorMap shard = read_safetensors(sp, u8 ? &shard_u8 : nullptr);
    for (const auto& n : names) {
      auto it = shard.find(n);
      auto bt = shard_u8.find(n);
      if (it == shard.end() && bt == shard_u8.end()) fail(sp, "missing tensor '" + n + "' that the index places in this shard");
      const bool fresh = it != shard.end() ? !all.count(n) && all.emplace(n, it->second).second
                                           : !all.count(n) && u8->emplace(n, bt->second).second;
      if (!fresh) fail(sp, "tensor '" + n + "' appears in more than one shard");
    }
    for (const auto& [n, t] : shard)
      if (!names.count(n)) unlisted(sp, n);
    for (const auto& [n, t] : shard_u8)
      if (!names.count(n)) unlisted(sp, n);
  }
  return all;
}

}  // namespace

TensorMap read_safetensors_any(const std::string& path, ByteTensorMap* u8) {
  std::error_code ec;
  if (!fs::exists(path, ec)) fail(path, "no such file or directory");
  if (!fs::is_directory(path, ec)) {
    // A shard index given directly (model.safetensors.index.json): its shards sit beside it.
    if (fs::path(path).extension() == ".json") return read_safetensors_index(path, u8);
    return read_safetensors(path, u8);
  }
  // HF's order (transformers' from_pretrained): a single model.safetensors wins over a shard index beside it.
  const fs::path dir(path);
  if (fs::exists(dir / "model.safetensors", ec)) return read_safetensors((dir / "model.safetensors").string(), u8);
  if (fs::exists(dir / "model.safetensors.index.json", ec))
    return read_safetensors_index((dir / "model.safetensors.index.json").string(), u8);
  if (fs::exists(dir / "adapter_model.safetensors", ec))
    return read_safetensors((dir / "adapter_model.safetensors").string(), u8);
  for (const char* bin : {"pytorch_model.bin", "pytorch_model.bin.index.json"})
    if (fs::exists(dir / bin, ec))
      fail(path, std::string("directory has ") + bin + " but no model.safetensors: only safetensors is read "
                 "(convert with safetensors.torch.save_file, or save with save_pretrained(safe_serialization=True))");
  fail(path, "directory has neither model.safetensors nor model.safetensors.index.json");
}

void write_safetensors(const std::string& path, const TensorMap& tensors) { write_safetensors(path, tensors, {}); }

void write_safetensors(const std::string& path, const TensorMap& tensors, const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& [name, t] : tensors) {
    const char* d = t.dtype == DType::bf16 ? "BF16" : t.dtype == DType::f16 ? "F16" : t.dtype == DType::f32 ? "F32" : "F64";
    const uint64_t n = uint64_t(t.numel()) * dtype_size(t.dtype);
    h[name] = {{"dtype", d}, {"shape", t.shape}, {"data_offsets", {off, off + n}}};
    off += n;
  }
  std::string text = h.dump();
  while ((text.size() + 8) % 8) text += ' ';  // pad so the data starts 8-byte aligned, as HF does
  write_file_atomically(path, [&](const ByteSink& put) {
    const uint64_t n = text.size();
    put(&n, 8);
    put(text.data(), n);
    for (const auto& [name, t] : tensors) put(t.bytes.get(), size_t(uint64_t(t.numel()) * dtype_size(t.dtype)));
  });
}

Checkpoint load_hf_checkpoint(const std::string& config_path, const std::string& weights_path,
                              const std::optional<std::string>& adapter_path, std::optional<int64_t> layers) {
  Checkpoint ck;
  const std::string config_text = read_text_file(config_path);
  ck.config = parse_config_json(config_text, config_path, &ck.warnings);
  if (layers) ck.config = with_layers(ck.config, *layers);
  // Tensors of deeper layers are dropped only when --layers asked for fewer layers; otherwise a checkpoint
  // deeper than its config is refused (its extra layers would silently not run).
  const bool allow_deeper = layers.has_value();
  // parse_config_json has refused every quantization but bitsandbytes 4-bit NF4 already.
  const json qc = parse_json(config_text).value("quantization_config", json());
  if (const std::optional<BnbConfig> q = parse_quantization_config(qc, config_path, nullptr)) {
    ByteTensorMap u8;
    ck.weights = read_safetensors_any(weights_path, &u8);
    normalize_checkpoint_names(ck.weights, &u8, weights_path);
    dequantize_bnb_checkpoint(ck.weights, u8, ck.config, *q, weights_path, allow_deeper, &ck.nf4);
    ck.quantization = q->describe() + ", read from the checkpoint";
  } else {
    ck.weights = read_safetensors_any(weights_path);
  }
  validate_checkpoint(ck, weights_path, allow_deeper);
  if (adapter_path) {
    std::error_code ec;
    if (!fs::exists(*adapter_path, ec)) fail(*adapter_path, "no such adapter file or directory");
    std::string cfg, tensors;
    if (fs::is_directory(*adapter_path, ec)) {
      cfg = (fs::path(*adapter_path) / "adapter_config.json").string();
      tensors = (fs::path(*adapter_path) / "adapter_model.safetensors").string();
      if (!fs::exists(tensors, ec) && fs::exists(fs::path(*adapter_path) / "adapter_model.bin", ec))
        fail(*adapter_path, "has adapter_model.bin but no adapter_model.safetensors: only safetensors is read "
                            "(save with save_pretrained(safe_serialization=True), PEFT's default)");
    } else {
      tensors = *adapter_path;
      cfg = (fs::path(*adapter_path).parent_path() / "adapter_config.json").string();
    }
    AdapterConfig a = parse_adapter_config_json(read_text_file(cfg), ck.config, cfg, &ck.warnings);
    Checkpoint ad;
    ad.config = ck.config;
    ad.adapter = a;
    ad.weights = read_safetensors(tensors);
    // A base weight in the adapter file would silently replace the checkpoint's (emplace keeps the first).
    for (const auto& [n, t] : ad.weights) {
      const std::string name = n.rfind("base_model.model.", 0) == 0 ? n.substr(17) : n;
      if (ck.weights.count(name) || name == kLmHeadName)
        fail(tensors, "tensor '" + n + "' is a base weight; an adapter file holds only lora_A and lora_B tensors");
      // PEFT on a bare Gemma2Model (AutoModel) names modules 'layers.N...'. transformers prefixes a bare base
      // checkpoint, but PEFT matches an adapter's keys to the loss-computing Gemma2ForCausalLM's modules
      // ('model.layers.N...') as they are: none would match, and the adapter would stay at its initialisation.
      // Said here, before validate_checkpoint would see bare and prefixed names together and blame the mix.
      if (bare_base_name(name))
        fail(tensors, "tensor '" + n + "' names its module without 'model.': an adapter made on a bare Gemma2Model, "
                      "whose keys PEFT does not match to Gemma2ForCausalLM's modules ('model." + name.substr(0, name.find(".lora_")) +
                      "'), so it would load none of them; rename the keys to 'base_model.model.model." + name + "'");
    }
    // PEFT writes every key with its prefix. A file that mixes the two kinds was put together by something else, and
    // a loader matching only one kind would leave the other's adapters at their initialisation: refused, not merged.
    // After the two checks above, whose defects are the more particular.
    const std::string* prefixed = nullptr;
    const std::string* unprefixed = nullptr;
    for (const auto& [n, t] : ad.weights)
      if (const std::string*& first = n.rfind("base_model.model.", 0) == 0 ? prefixed : unprefixed; !first) first = &n;
    if (prefixed && unprefixed)
      fail(tensors, "mixes tensor names with and without PEFT's 'base_model.model.' prefix ('" + *prefixed + "' and '" +
                        *unprefixed + "'): PEFT writes every key prefixed");
    // Base weights are already checked: validate the adapter tensors on their own, against base + adapter specs.
    for (const auto& [n, t] : ck.weights) ad.weights.emplace(n, t);
    validate_checkpoint(ad, tensors, allow_deeper);
    ad.warnings = std::move(ck.warnings);
    ck = std::move(ad);
  }
  return ck;
}

}  // namespace gemma
