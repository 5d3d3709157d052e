// The bad-input catalogue: every way we know that a user's case file, checkpoint, config or command line can
// be wrong, each refused with exit status 2 (or InputError at the API) and one line on stderr that names the
// file, tensor or flag and the problem; never a signal, an uncaught exception or a half-written output.
// Files are made at run time by the model's own writers and then damaged, so each test's input differs
// from a valid one by exactly the defect it names; the valid ones pass (GoodInput.*), which is what makes a
// rejection mean something. Inputs found by the fuzzers live in tests/badinput/.
#include <gtest/gtest.h>

#include <sys/resource.h>
#include <csignal>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "model/casefile.hpp"
#include "model/safetensors.hpp"
#include "tests/badinput_support.hpp"
#include "tests/tiny_case.hpp"

using namespace gemma;
using namespace gemma::test;
using nlohmann::json;

namespace {

const std::string kVerify = GEMMA_VERIFY_BIN;
const std::string kTrain = GEMMA_TRAIN_BIN;
const std::string kMakeCase = GEMMA_MAKE_CASE_BIN;
const std::string kFound = GEMMA_BADINPUT_DIR;  // fuzz-found inputs

std::string write_tiny_case(const TempDir& d, const std::function<void(CaseFile&)>& mutate = {},
                            const std::string& name = "case.h5") {
  CaseFile cf = tiny_case();
  if (mutate) mutate(cf);
  const std::string p = d / name;
  write_case(p, cf);
  return p;
}

ToolRun verify_case(const TempDir& d, const std::string& path, std::vector<std::string> extra = {},
                    const std::vector<std::string>& env = {}) {
  std::vector<std::string> args = {"--case", path};
  args.insert(args.end(), extra.begin(), extra.end());
  return run_tool(kVerify, args, d, env);
}

// A float tensor of `shape` with every element `v`.
Tensor filled(DType dt, const Shape& shape, double v) {
  return tensor_from_doubles(dt, shape, std::vector<double>(size_t(shape_numel(shape)), v));
}

// The tiny model as an HF checkpoint: config.json and model.safetensors in `d`.
struct Checkpoint_ {
  std::string config, weights;
};
Checkpoint_ write_checkpoint(const TempDir& d, const std::function<void(TensorMap&)>& mutate_weights = {},
                             const std::function<void(json&)>& mutate_config = {}) {
  json c = json::parse(to_config_json(tiny_config()));
  if (mutate_config) mutate_config(c);
  Checkpoint_ ck{d / "config.json", d / "model.safetensors"};
  spit(ck.config, c.dump(2));
  TensorMap w = tiny_case().model.weights;
  if (mutate_weights) mutate_weights(w);
  write_safetensors(ck.weights, w);
  return ck;
}

ToolRun verify_checkpoint(const TempDir& d, const std::string& config, const std::string& weights,
                          std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"--config", config, "--weights", weights, "--seq", "6"};
  args.insert(args.end(), extra.begin(), extra.end());
  return run_tool(kVerify, args, d);
}

// A safetensors file from raw parts: the 8-byte little-endian header length, the header, the data.
std::string safetensors_bytes(const std::string& header, const std::string& data, uint64_t len) {
  std::string s(reinterpret_cast<const char*>(&len), 8);
  return s + header + data;
}
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  return safetensors_bytes(header, data, header.size());
}

// A valid tiny model.safetensors whose header entry for model.norm.weight (F32 [4], the last 16 bytes of
// the data) is replaced by `entry`.
std::string with_norm_entry(const json& entry) {
  TensorMap w = tiny_case().model.weights;
  w.erase(kFinalNormName);
  json h = json::object();
  std::string data;
  for (const auto& [n, t] : w) {
    const std::string bytes(reinterpret_cast<const char*>(t.bytes.get()), size_t(t.numel()) * dtype_size(t.dtype));
    h[n] = {{"dtype", "BF16"}, {"shape", t.shape}, {"data_offsets", {data.size(), data.size() + bytes.size()}}};
    data += bytes;
  }
  const float norm[4] = {0.1f, 0.2f, 0.3f, 0.4f};
  json e = entry;
  for (auto& o : e["data_offsets"]) o = o.get<int64_t>() + int64_t(data.size());
  h[kFinalNormName] = e;
  data.append(reinterpret_cast<const char*>(norm), 16);
  return safetensors_bytes(h.dump(), data);
}
const json kNormEntry = {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}};

}  // namespace

// ------------------------------------------------------------------------------------------------------
// Controls: the unmodified inputs every test below damages are accepted, so each rejection is the defect's.

TEST(GoodInput, TinyCaseFilePassesVerify) {
  TempDir d;
  const ToolRun r = verify_case(d, write_tiny_case(d));
  ASSERT_TRUE(r.exited);
  EXPECT_EQ(r.status, 0) << r.err << r.out;
}

// A case whose only /expected results are of another softcap combination than the run's: nothing of them is
// compared, which "1/1 checks passed" did not say (found by a probe, 2026-12-05). A warning says it; with that
// combination asked for they are compared (and the wrong loss here fails).
TEST(GoodInput, ExpectedResultsOfAnotherCombinationAreSaidToBeUncompared) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.expected["none"].loss = 123.0;
    cf.provenance["expected_kind"] = "hf-float64-patched";
  });
  const ToolRun r = verify_case(d, p, {"--softcap", "attn,logits"});
  EXPECT_EQ(r.status, 0) << r.err << r.out;
  EXPECT_NE(r.err.find("its /expected results (--softcap none) are not compared"), std::string::npos) << r.err;
  const ToolRun none = verify_case(d, p, {"--softcap", "none"});
  EXPECT_EQ(none.status, 1) << none.err << none.out;
  EXPECT_EQ(none.err.find("not compared"), std::string::npos) << none.err;
}

TEST(GoodInput, TinyCheckpointPassesVerify) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  const ToolRun r = verify_checkpoint(d, ck.config, ck.weights);
  ASSERT_TRUE(r.exited);
  EXPECT_EQ(r.status, 0) << r.err << r.out;
}

TEST(GoodInput, TinyCheckpointWithAdapterPassesVerify) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  fs::create_directories(d.dir / "adapter");
  spit(d / "adapter/adapter_config.json", to_adapter_config_json(tiny_adapter()));
  write_safetensors(d / "adapter/adapter_model.safetensors", synthetic_adapters(tiny_config(), tiny_adapter(), 3));
  const ToolRun r = verify_checkpoint(d, ck.config, ck.weights, {"--adapter", d / "adapter"});
  ASSERT_TRUE(r.exited);
  EXPECT_EQ(r.status, 0) << r.err << r.out;
}

// ------------------------------------------------------------------------------------------------------
// Case files: not HDF5, damaged HDF5

TEST(BadCaseFile, TextFileIsNotHdf5) {
  TempDir d;
  spit(d / "notes.h5", "this is not an HDF5 file\n");
  expect_rejected(verify_case(d, d / "notes.h5"), "verify", {d / "notes.h5", "not an HDF5 file"});
}

TEST(BadCaseFile, EmptyFile) {
  TempDir d;
  spit(d / "empty.h5", "");
  expect_rejected(verify_case(d, d / "empty.h5"), "verify", {d / "empty.h5", "empty file"});
}

TEST(BadCaseFile, MissingFile) {
  TempDir d;
  expect_rejected(verify_case(d, d / "absent.h5"), "verify", {d / "absent.h5", "no such file"});
}

TEST(BadCaseFile, DirectoryInsteadOfFile) {
  TempDir d;
  expect_rejected(verify_case(d, d.dir.string()), "verify", {d.dir.string(), "is a directory"});
}

TEST(BadCaseFile, TruncatedToHalf) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  fs::resize_file(p, fs::file_size(p) / 2);
  expect_rejected(verify_case(d, p), "verify", {p, "truncated"});
}

TEST(BadCaseFile, TruncatedAfterSignature) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  fs::resize_file(p, 12);
  expect_rejected(verify_case(d, p), "verify", {p, "HDF5 file"});
}

// The root group's B-tree node ("TREE" at its start): every object below the root is lost.
TEST(BadCaseFile, CorruptRootGroupBTree) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  const size_t at = slurp(p).find("TREE");
  ASSERT_NE(at, std::string::npos);
  patch(p, at, "XXXX");
  expect_rejected(verify_case(d, p), "verify", {p, "reading case file"});
}

// The global heap holding the variable-length config_json string ("GCOL"), damaged past its signature.
TEST(BadCaseFile, CorruptGlobalHeapOfConfigString) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  const size_t at = slurp(p).find("GCOL");
  ASSERT_NE(at, std::string::npos);
  patch(p, at + 16, std::string(16, '\xff'));
  expect_rejected(verify_case(d, p), "verify", {p, "config_json"});
}

// Found by fuzz_case in its first minute: libhdf5 1.10.8 memcpys gigabytes out of a corrupt global-heap
// object (H5HG_read). It crashes any process that reads it, hence read_case's child process.
TEST(BadCaseFile, FuzzFoundGlobalHeapCrashInLibhdf5) {
  TempDir d;
  const std::string p = kFound + "/case-hdf5-global-heap-memcpy.h5";
  expect_rejected(verify_case(d, p), "verify", {p, "corrupt HDF5 file"});
  expect_input_error([&] { read_case(p); }, {p, "corrupt HDF5 file"});
}

// Found by fuzz_case: libhdf5 spins forever in H5HG__protect on this global heap. The reader child's CPU
// limit ends it (shortened here to keep the test fast).
TEST(BadCaseFile, FuzzFoundGlobalHeapHangInLibhdf5) {
  TempDir d;
  const std::string p = kFound + "/case-hdf5-global-heap-hang.h5";
  expect_rejected(verify_case(d, p, {}, {"GEMMA_HDF5_CPU_SECONDS=0.5"}), "verify",
                  {p, "libhdf5 was still reading it after 0.5 s of CPU time"});
}

// Found by fuzz_case (as a crash of a reader child): libhdf5 reads an attribute name past its heap buffer
// (H5MM_xstrdup under H5Aexists). Unsanitized, the overflow goes unnoticed and yields garbage; either way
// the file is refused, naming it. The message depends on what the overflow read, so only the file is checked.
TEST(BadCaseFile, FuzzFoundAttributeNameOverflowInLibhdf5) {
  TempDir d;
  const std::string p = kFound + "/case-hdf5-attribute-name-overflow.h5";
  expect_rejected(verify_case(d, p), "verify", {p + ": "});
}

// Found by fuzz_case: a corrupt metadata size makes libhdf5 allocate 163 GB (H5C_protect). Refused either as
// HDF5's own allocation error or as a dead reader child (a sanitizer's allocator aborts instead).
TEST(BadCaseFile, FuzzFoundHugeMetadataAllocationInLibhdf5) {
  TempDir d;
  const std::string p = kFound + "/case-hdf5-metadata-cache-huge-alloc.h5";
  expect_rejected(verify_case(d, p), "verify", {p + ": "});
}

// ------------------------------------------------------------------------------------------------------
// Case files: attributes

TEST(BadCaseFile, MissingConfigAttribute) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) { f.removeAttr("config_json"); });
  expect_rejected(verify_case(d, p), "verify", {p, "missing root attribute 'config_json'"});
}

TEST(BadCaseFile, ConfigAttributeIsAnInteger) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    f.removeAttr("config_json");
    const int v = 7;
    f.createAttribute("config_json", H5::PredType::NATIVE_INT, H5::DataSpace(H5S_SCALAR)).write(H5::PredType::NATIVE_INT, &v);
  });
  expect_rejected(verify_case(d, p), "verify", {p, "attribute 'config_json' is not a string"});
}

// HDF5's C++ API reads a variable-length string attribute into a single char*; with two strings it wrote
// the second pointer past it (a stack overflow in the reader) before the reader checked the extent.
TEST(BadCaseFile, ConfigAttributeIsAStringArray) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    f.removeAttr("config_json");
    H5::StrType st(H5::PredType::C_S1, H5T_VARIABLE);
    const hsize_t n = 2;
    const char* v[2] = {"{}", "{}"};
    f.createAttribute("config_json", st, H5::DataSpace(1, &n)).write(st, v);
  });
  expect_rejected(verify_case(d, p), "verify", {p, "attribute 'config_json' holds 2 strings, expected one"});
}

TEST(BadCaseFile, ConfigAttributeIsMalformedJson) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    f.removeAttr("config_json");
    h5::write_string_attr(f, "config_json", "{\"vocab_size\": 8,");
  });
  expect_rejected(verify_case(d, p), "verify", {p, "config_json: malformed JSON"});
}

// A bitsandbytes NF4 quantization_config is implemented for a checkpoint's packed weights; a case file's float
// /weights were run unquantized with the key read past (found by an adversarial probe, 2026-12-05).
TEST(BadCaseFile, QuantizationConfigIsRefused) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [&](H5::H5File& f) {
    json c = json::parse(h5::read_string_attr(f, "config_json", p));
    c["quantization_config"] = {{"quant_method", "bitsandbytes"}, {"load_in_4bit", true}, {"bnb_4bit_quant_type", "nf4"}};
    f.removeAttr("config_json");
    h5::write_string_attr(f, "config_json", c.dump());
  });
  expect_rejected(verify_case(d, p), "verify", {p, "config_json: quantization_config is not implemented for a case file"});
}

// expected_kind picks the tolerances; as an integer it was skipped and the default ones applied (found by a probe).
TEST(BadCaseFile, ExpectedKindThatIsNotAString) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.expected["attn_logits"].loss = 1.0; });
  edit_h5(p, [](H5::H5File& f) {
    H5::Group e = f.openGroup("expected");
    const int v = 3;
    e.createAttribute("expected_kind", H5::PredType::NATIVE_INT, H5::DataSpace(H5S_SCALAR)).write(H5::PredType::NATIVE_INT, &v);
  });
  expect_rejected(verify_case(d, p), "verify", {p, "attribute 'expected_kind' is not a string"});
}

// Results under names the reader does not know were never compared while the run said "1/1 checks passed" (found
// by a probe, 2026-12-05): a misspelt loss, a result stored as a numeric attribute, a combo with nothing in it, an
// expected_kind the tolerances do not know (a trailing space got float64's tolerances without a word).
TEST(BadCaseFile, ExpectedResultsUnderUnknownNamesAreRefused) {
  TempDir d;
  const auto with_loss = [](CaseFile& cf) { cf.expected["attn_logits"].loss = 1.0; };
  const std::string misspelt = write_tiny_case(d, with_loss, "misspelt.h5");
  edit_h5(misspelt, [](H5::H5File& f) {
    H5::Group g = f.openGroup("expected/attn_logits");
    const double v = 123.0;
    g.createDataSet("Loss", H5::PredType::NATIVE_DOUBLE, H5::DataSpace(H5S_SCALAR)).write(&v, H5::PredType::NATIVE_DOUBLE);
  });
  expect_rejected(verify_case(d, misspelt), "verify", {misspelt, "'/expected/attn_logits/Loss' is not an expected result"});

  const std::string attr = write_tiny_case(d, with_loss, "attr.h5");
  edit_h5(attr, [](H5::H5File& f) {
    H5::Group g = f.openGroup("expected/attn_logits");
    const double v = 123.0;
    g.createAttribute("logits", H5::PredType::NATIVE_DOUBLE, H5::DataSpace(H5S_SCALAR)).write(H5::PredType::NATIVE_DOUBLE, &v);
  });
  expect_rejected(verify_case(d, attr), "verify", {attr, "'/expected/attn_logits' has attribute 'logits'"});

  const std::string empty = write_tiny_case(d, with_loss, "empty.h5");
  edit_h5(empty, [](H5::H5File& f) { f.openGroup("expected").createGroup("none"); });
  expect_rejected(verify_case(d, empty), "verify", {empty, "'/expected/none' holds no result"});

  const std::string kind = write_tiny_case(d, [&](CaseFile& cf) {
    with_loss(cf);
    cf.provenance["expected_kind"] = "hf-float64-shipped ";
  }, "kind.h5");
  expect_rejected(verify_case(d, kind), "verify", {kind, "expected_kind 'hf-float64-shipped '", "not one this reader knows"});

  // Provenance strings on a combo (the HF cross-check's hf_loss_dtype) and known kinds stay accepted.
  const std::string good = write_tiny_case(d, [&](CaseFile& cf) {
    cf.expected["attn_logits"].loss = 1.0;
    cf.provenance["expected_kind"] = "reference-float64";
  }, "good.h5");
  edit_h5(good, [](H5::H5File& f) {
    H5::Group g = f.openGroup("expected/attn_logits");
    h5::write_string_attr(g, "hf_loss_dtype", "float32");
  });
  const ToolRun r = verify_case(d, good);
  EXPECT_EQ(r.status, 1) << "the wrong loss is compared and fails: " << r.err << r.out;
}

// An unsigned 64-bit id above INT64_MAX arrived as INT64_MAX (libhdf5's conversion), so its refusal quoted
// 9223372036854775807 for 2^64 - 5 (found by a probe, 2026-12-05). The value is now named as stored.
TEST(BadCaseFile, AnUnsigned64BitIdIsQuotedAsStored) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    f.unlink("input_ids");
    const hsize_t dims[2] = {2, 4};
    std::vector<uint64_t> ids = {1, 2, ~uint64_t(4), 3, 1, 2, 3, 4};
    f.createDataSet("input_ids", H5::PredType::NATIVE_UINT64, H5::DataSpace(2, dims)).write(ids.data(), H5::PredType::NATIVE_UINT64);
  });
  expect_rejected(verify_case(d, p), "verify", {p, "'input_ids' has the value 18446744073709551611 at flat index 2"});
}

TEST(BadCaseFile, AdapterConfigWithoutAdapterTensors) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.model.adapter = tiny_adapter(); });
  expect_rejected(verify_case(d, p), "verify", {p, "missing tensor 'model.layers.0.self_attn.q_proj.lora_A.weight'"});
}

TEST(BadCaseFile, AdapterTensorsWithoutAdapterConfig) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    TensorMap a = synthetic_adapters(cf.model.config, tiny_adapter(), 3);
    cf.model.weights.insert(a.begin(), a.end());
  });
  expect_rejected(verify_case(d, p), "verify", {p, "adapter tensor", "no adapter config was given"});
}

TEST(BadCaseFile, AdapterRankDiffersFromConfig) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.model.adapter = tiny_adapter(2);
    TensorMap a = synthetic_adapters(cf.model.config, tiny_adapter(3), 3);
    cf.model.weights.insert(a.begin(), a.end());
  });
  expect_rejected(verify_case(d, p), "verify",
                  {p, "tensor 'model.layers.0.self_attn.q_proj.lora_A.weight' has shape [3, 4], expected [2, 4]"});
}

// ------------------------------------------------------------------------------------------------------
// Case files: weights

TEST(BadCaseFile, MissingWeightsGroup) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) { f.unlink("weights"); });
  expect_rejected(verify_case(d, p), "verify", {p, "missing group '/weights'"});
}

TEST(BadCaseFile, MissingTensor) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.model.weights.erase("model.layers.1.mlp.up_proj.weight"); });
  expect_rejected(verify_case(d, p), "verify", {p, "missing tensor 'model.layers.1.mlp.up_proj.weight'"});
}

TEST(BadCaseFile, ExtraTensor) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.model.weights["model.layers.0.self_attn.qkv_proj.weight"] = filled(DType::f32, {8, 4}, 0.5);
  });
  expect_rejected(verify_case(d, p), "verify", {p, "unexpected tensor 'model.layers.0.self_attn.qkv_proj.weight'"});
}

// Names come from the file: a newline in one would have split the one-line message in two.
TEST(BadCaseFile, NewlineInATensorName) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.model.weights["model.extra\nweight"] = filled(DType::f32, {4}, 0.5); });
  expect_rejected(verify_case(d, p), "verify", {p, "unexpected tensor 'model.extra\\x0aweight'"});
}

TEST(BadCaseFile, TensorOfALayerTheConfigDoesNotHave) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.model.weights["model.layers.2.input_layernorm.weight"] = filled(DType::f32, {4}, 0.5);
  });
  expect_rejected(
      verify_case(d, p), "verify",
      {p, "tensor 'model.layers.2.input_layernorm.weight' is of layer 2: the checkpoint has 3 layers, the config 2"});
}

TEST(BadCaseFile, MisnamedTensor) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.model.weights["model.final_norm.weight"] = cf.model.weights.at(kFinalNormName);
    cf.model.weights.erase(kFinalNormName);
  });
  expect_rejected(verify_case(d, p), "verify", {p, "missing tensor 'model.norm.weight'"});
}

TEST(BadCaseFile, TransposedTensor) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.model.weights["model.layers.0.mlp.gate_proj.weight"] = filled(DType::f32, {4, 6}, 0.1);
  });
  expect_rejected(verify_case(d, p), "verify",
                  {p, "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [4, 6], expected [6, 4]"});
}

TEST(BadCaseFile, IntegerWeights) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    H5::Group w = f.openGroup("weights");
    w.unlink(kFinalNormName);
    h5::write_ints(w, kFinalNormName, {4}, {1, 1, 1, 1});
  });
  expect_rejected(verify_case(d, p), "verify", {p, "'model.norm.weight' is not a floating-point dataset"});
}

TEST(BadCaseFile, WeightIsAGroup) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) { f.createGroup("weights/model.extra"); });
  expect_rejected(verify_case(d, p), "verify", {p, "'/weights/model.extra' is not a dataset"});
}

TEST(BadCaseFile, NaNInWeights) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.model.weights["model.layers.1.self_attn.o_proj.weight"] =
        filled(DType::f32, {4, 4}, std::numeric_limits<double>::quiet_NaN());
  });
  expect_rejected(verify_case(d, p), "verify", {p, "tensor 'model.layers.1.self_attn.o_proj.weight' has a non-finite value (nan)"});
}

TEST(BadCaseFile, InfInWeights) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    std::vector<double> v(32, 0.25);
    v[17] = -INFINITY;
    cf.model.weights[kEmbedName] = tensor_from_doubles(DType::f64, {8, 4}, v);
  });
  expect_rejected(verify_case(d, p), "verify", {p, "tensor 'model.embed_tokens.weight' has a non-finite value (-inf) at flat index 17"});
}

TEST(BadCaseFile, StoredLmHeadDiffersFromEmbedding) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.model.weights[kLmHeadName] = filled(DType::f32, {8, 4}, 0.5); });
  expect_rejected(verify_case(d, p), "verify", {p, "lm_head.weight differs from model.embed_tokens.weight"});
}

// A chunked dataset whose chunks were never written reads as its fill value: this 30 KB file declares a
// 4 GiB weight. The reader refuses before allocating (a decompression bomb costs no more than this).
TEST(BadCaseFile, DatasetDeclaresFarMoreThanTheFileHolds) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    H5::Group w = f.openGroup("weights");
    w.unlink(kEmbedName);
    const hsize_t dims[2] = {hsize_t(1) << 27, 4}, chunk[2] = {1024, 4};
    H5::DSetCreatPropList pl;
    pl.setChunk(2, chunk);
    w.createDataSet(kEmbedName, H5::PredType::IEEE_F64LE, H5::DataSpace(2, dims), pl);
  });
  ASSERT_LT(fs::file_size(p), 100000u);
  expect_rejected(verify_case(d, p), "verify", {p, "'model.embed_tokens.weight' would take 4294967296 bytes in memory"});
}

// ------------------------------------------------------------------------------------------------------
// Case files: the batch

TEST(BadCaseFile, FloatInputIds) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    f.unlink("input_ids");
    const double v[8] = {1, 2, 3, 4, 5, 6, 7, 0};
    h5::write_doubles(f, "input_ids", {2, 4}, v);
  });
  expect_rejected(verify_case(d, p), "verify", {p, "'input_ids' is not an integer dataset"});
}

TEST(BadCaseFile, MissingLabels) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) { f.unlink("labels"); });
  expect_rejected(verify_case(d, p), "verify", {p, "missing dataset 'labels'"});
}

TEST(BadCaseFile, InputIdsOneDimensional) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    f.unlink("input_ids");
    f.unlink("labels");
    h5::write_ints(f, "input_ids", {4}, {1, 2, 3, 4});
    h5::write_ints(f, "labels", {4}, {1, 2, 3, 4});
  });
  expect_rejected(verify_case(d, p), "verify", {p, "input_ids must be [B, T], has shape [4]"});
}

TEST(BadCaseFile, LabelsShapeDiffersFromInputIds) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    f.unlink("labels");
    h5::write_ints(f, "labels", {2, 3}, {1, 2, 3, 4, 5, 6});
  });
  expect_rejected(verify_case(d, p), "verify", {p, "labels shape [2, 3] does not match input_ids shape [2, 4]"});
}

TEST(BadCaseFile, NegativeInputId) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.batch.input_ids[6] = -1; });
  expect_rejected(verify_case(d, p), "verify", {p, "input_ids[1, 2] = -1 is outside [0, 8)"});
}

TEST(BadCaseFile, InputIdBeyondVocabulary) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.batch.input_ids[0] = 8; });
  expect_rejected(verify_case(d, p), "verify", {p, "input_ids[0, 0] = 8 is outside [0, 8)"});
}

// A label one past the vocabulary points into a padded LM head (e.g. JAX's 256128 rows for 256000 tokens):
// those rows are masked out of the softmax, so such a label is an input error (docs/model.md, vocabulary padding).
TEST(BadCaseFile, LabelInPaddedVocabulary) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.batch.labels[1] = 8; });
  expect_rejected(verify_case(d, p), "verify", {p, "labels[0, 1] = 8 is neither -100 nor in [0, 8)"});
}

TEST(BadCaseFile, LabelBelowIgnoreIndex) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.batch.labels[5] = -101; });
  expect_rejected(verify_case(d, p), "verify", {p, "labels[1, 1] = -101 is neither -100 nor in [0, 8)"});
}

TEST(BadCaseFile, ZeroBatch) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    f.unlink("input_ids");
    f.unlink("labels");
    h5::write_ints(f, "input_ids", {0, 4}, {});
    h5::write_ints(f, "labels", {0, 4}, {});
  });
  expect_rejected(verify_case(d, p), "verify", {p, "batch shape [0, 4] is empty"});
}

TEST(BadCaseFile, ZeroSequence) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    f.unlink("input_ids");
    f.unlink("labels");
    h5::write_ints(f, "input_ids", {2, 0}, {});
    h5::write_ints(f, "labels", {2, 0}, {});
  });
  expect_rejected(verify_case(d, p), "verify", {p, "batch shape [2, 0] is empty"});
}

TEST(BadCaseFile, SequenceOfOneTokenHasNoTarget) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.batch.T = 1;
    cf.batch.input_ids = {1, 2};
    cf.batch.labels = {1, 2};
  });
  expect_rejected(verify_case(d, p), "verify", {p, "sequence length T = 1 leaves no target"});
}

// Not bad input: transformers runs a sequence past max_position_embeddings (RoPE is a formula of the position), so
// verify does too, and says so on stderr.
TEST(LongCaseFile, SequenceBeyondMaxPositionsRunsWithAWarning) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.batch = synthetic_batch(cf.model.config, 1, 17, 3, 0.0); });
  const ToolRun r = verify_case(d, p);
  ASSERT_TRUE(r.exited);
  EXPECT_NE(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("sequence length 17 exceeds max_position_embeddings 16: RoPE continues"), std::string::npos) << r.err;
}

// With position_ids, the positions RoPE sees are theirs: the warning followed T (found by a probe, 2026-12-05), so
// a packed row of 17 whose documents stay within 16 positions was warned about, and positions up to 40 in a row of
// 4 were not.
TEST(LongCaseFile, TheWarningFollowsThePositionIds) {
  TempDir d;
  const std::string packed = write_tiny_case(d, [](CaseFile& cf) {
    cf.batch = synthetic_batch(cf.model.config, 1, 17, 3, 0.0);
    for (int64_t t = 0; t < 17; ++t) cf.batch.position_ids.push_back(t < 9 ? t : t - 9);
  }, "packed.h5");
  const ToolRun p = verify_case(d, packed);
  EXPECT_EQ(p.status, 0) << p.err;
  EXPECT_EQ(p.err.find("max_position_embeddings"), std::string::npos) << p.err;
  const std::string far = write_tiny_case(d, [](CaseFile& cf) { cf.batch.position_ids = {37, 38, 39, 40, 0, 1, 2, 3}; }, "far.h5");
  const ToolRun f = verify_case(d, far);
  EXPECT_EQ(f.status, 0) << f.err;
  EXPECT_NE(f.err.find("position_ids reach 40, past max_position_embeddings 16: RoPE continues"), std::string::npos) << f.err;
}

// Documented behaviour (docs/robustness.md): a batch with nothing to score is refused, not given loss 0.
TEST(BadCaseFile, EveryLabelIgnored) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.batch.labels.assign(8, kIgnoreIndex); });
  expect_rejected(verify_case(d, p), "verify", {p, "every label is ignored (-100): the mean loss is undefined (0/0)"});
}

// Only the first position's label is scored by nobody (position t is scored against labels[t + 1]): a batch
// whose only non-ignored labels sit at t = 0 scores nothing either.
TEST(BadCaseFile, OnlyUnscoredLabelsKept) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.batch.labels = {3, kIgnoreIndex, kIgnoreIndex, kIgnoreIndex, 5, kIgnoreIndex, kIgnoreIndex, kIgnoreIndex};
  });
  expect_rejected(verify_case(d, p), "verify", {p, "every label is ignored (-100)"});
}

// ------------------------------------------------------------------------------------------------------
// Case files: expected results

TEST(BadCaseFile, ExpectedForAnUnknownCombination) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) { f.createGroup("expected").createGroup("attn+logits"); });
  expect_rejected(verify_case(d, p), "verify", {p, "'/expected/attn+logits' is not one of none, attn, logits, attn_logits"});
}

TEST(BadCaseFile, ExpectedLossIsNaN) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.expected["attn_logits"].loss = std::nan(""); });
  expect_rejected(verify_case(d, p), "verify", {p, "/expected/attn_logits/loss is", "not a finite number"});
}

TEST(BadCaseFile, ExpectedLossIsNotAScalar) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  edit_h5(p, [](H5::H5File& f) {
    H5::Group g = f.createGroup("expected").createGroup("none");
    const double v[2] = {1, 2};
    h5::write_doubles(g, "loss", {2}, v);
  });
  expect_rejected(verify_case(d, p), "verify", {p, "'/expected/none/loss' must be a scalar, has shape [2]"});
}

TEST(BadCaseFile, ExpectedLogitsOfTheWrongShape) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.expected["none"].logits = filled(DType::f64, {2, 4, 9}, 0.0); });
  expect_rejected(verify_case(d, p), "verify", {p, "/expected/none/logits has shape [2, 4, 9], expected [2, 4, 8]"});
}

TEST(BadCaseFile, ExpectedGradientOfAFrozenWeight) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.model.adapter = tiny_adapter();
    TensorMap a = synthetic_adapters(cf.model.config, *cf.model.adapter, 3);
    cf.model.weights.insert(a.begin(), a.end());
    cf.expected["attn_logits"].grads[kFinalNormName] = filled(DType::f64, {4}, 0.0);
  });
  expect_rejected(verify_case(d, p), "verify", {p, "/expected/attn_logits/grads/model.norm.weight is not a trainable weight"});
}

TEST(BadCaseFile, ExpectedCapTheConfigDoesNotHave) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) {
    cf.model.config.attn_logit_softcapping.reset();
    cf.expected["attn"].loss = 2.0;
  });
  expect_rejected(verify_case(d, p), "verify", {p, "/expected/attn", "attn_logit_softcapping is null"});
}

// ------------------------------------------------------------------------------------------------------
// config.json

TEST(BadConfig, HeadsNotAMultipleOfKvHeads) {
  TempDir d;
  const auto ck = write_checkpoint(d, {}, [](json& c) { c["num_key_value_heads"] = 3; });
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.config, "num_attention_heads (2) is not a multiple of num_key_value_heads (3)"});
}

// A missing key takes Gemma2Config's default (tests/test_inputs.cpp, ConfigKeys.MissingKeysTakeGemma2ConfigDefaults);
// where the checkpoint's shapes disagree with that default, the file is refused naming the key.
TEST(BadConfig, MissingKey) {
  TempDir d;
  const auto ck = write_checkpoint(d, {}, [](json& c) { c.erase("vocab_size"); });
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify", {"vocab_size"});
}

TEST(BadConfig, WrongType) {
  TempDir d;
  const auto ck = write_checkpoint(d, {}, [](json& c) { c["hidden_size"] = "4"; });
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify", {ck.config, "key 'hidden_size' must be an integer, got \"4\""});
}

TEST(BadConfig, FractionalInteger) {
  expect_input_error([] {
    json c = json::parse(to_config_json(tiny_config()));
    c["num_hidden_layers"] = 2.5;
    parse_config_json(c.dump(), "config.json", nullptr);
  }, {"config.json", "key 'num_hidden_layers' must be an integer, got 2.5"});
}

TEST(BadConfig, MalformedJson) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  spit(ck.config, slurp(ck.config).substr(0, 100));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify", {ck.config, "malformed JSON"});
}

// Read to its end, /dev/zero never ends.
TEST(BadConfig, DeviceInsteadOfAFile) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  expect_rejected(verify_checkpoint(d, "/dev/zero", ck.weights), "verify", {"/dev/zero: is not a regular file"});
}

TEST(BadConfig, NotAnObject) {
  expect_input_error([] { parse_config_json("[1, 2, 3]", "config.json", nullptr); },
                     {"config.json: config is not a JSON object"});
}

// Found by fuzz_config: 54e57203... is valid JSON syntax but no double holds it; nlohmann throws out_of_range,
// which the parsers did not catch (an uncaught exception: abort).
TEST(BadConfig, FuzzFoundNumberBeyondDouble) {
  const std::string text = slurp(kFound + "/config-number-out-of-range.json");
  expect_input_error([&] { parse_config_json(text, "config.json", nullptr); },
                     {"config.json: malformed JSON", "out_of_range"});
  expect_input_error([&] { parse_adapter_config_json(text, tiny_config(), "adapter_config.json", nullptr); },
                     {"adapter_config.json: malformed JSON"});
  TempDir d;
  const auto ck = write_checkpoint(d);
  expect_rejected(verify_checkpoint(d, kFound + "/config-number-out-of-range.json", ck.weights), "verify",
                  {"config-number-out-of-range.json", "malformed JSON"});
}

// Error messages quote the offending value; quoting a value nested a million deep recursed as deep (stack
// overflow) before the quote was made shallow.
TEST(BadConfig, DeeplyNestedValue) {
  json c = json::parse(to_config_json(tiny_config()));
  const std::string deep = std::string(1000000, '[') + std::string(1000000, ']');
  std::string text = c.dump();
  text.replace(text.find("\"gemma2\""), 8, deep);
  expect_input_error([&] { parse_config_json(text, "config.json", nullptr); },
                     {"config.json: model_type is a list of 1 entries"});
}

TEST(BadConfig, LayerTypesCountDiffersFromLayers) {
  expect_input_error([] {
    json c = json::parse(to_config_json(tiny_config()));
    c["layer_types"].push_back("full_attention");
    parse_config_json(c.dump(), "config.json", nullptr);
  }, {"config.json: layer_types has 3 entries for 2 layers"});
}

TEST(BadConfig, OddHeadDim) {
  expect_input_error([] {
    json c = json::parse(to_config_json(tiny_config()));
    c["head_dim"] = 3;
    parse_config_json(c.dump(), "config.json", nullptr);
  }, {"config.json: head_dim must be even for rotary embeddings, got 3"});
}

TEST(BadConfig, AnotherModelType) {
  expect_input_error([] {
    json c = json::parse(to_config_json(tiny_config()));
    c["model_type"] = "llama";
    parse_config_json(c.dump(), "config.json", nullptr);
  }, {"config.json: model_type is \"llama\", expected \"gemma2\""});
}

TEST(BadConfig, NegativeVocabulary) {
  expect_input_error([] {
    json c = json::parse(to_config_json(tiny_config()));
    c["vocab_size"] = -8;
    parse_config_json(c.dump(), "config.json", nullptr);
  }, {"config.json: vocab_size must be positive, got -8"});
}

TEST(BadConfig, ImplausiblyLargeDimension) {
  expect_input_error([] {
    json c = json::parse(to_config_json(tiny_config()));
    c["vocab_size"] = int64_t(1) << 40;
    parse_config_json(c.dump(), "config.json", nullptr);
  }, {"config.json: a dimension is implausibly large"});
}


// ------------------------------------------------------------------------------------------------------
// safetensors

TEST(BadSafetensors, HeaderLengthBeyondFile) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  spit(ck.weights, safetensors_bytes("{}", "", 4096));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "header length 4096 runs beyond the end of the file (10 bytes)"});
}

TEST(BadSafetensors, HeaderLengthAbsurd) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  spit(ck.weights, safetensors_bytes("{}", "", uint64_t(1) << 62));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify", {ck.weights, "is absurdly large (> 100 MiB)"});
}

TEST(BadSafetensors, HeaderNotJson) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  spit(ck.weights, safetensors_bytes("{\"model.norm.weight\": {\"dtype\": ", std::string(16, '\0')));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify", {ck.weights, "header is not valid JSON"});
}

// nlohmann's parser skips a UTF-8 byte order mark before the header; the safetensors library (serde_json) refuses
// the file, so it loaded here and nowhere else (a probe). The header is otherwise the valid one.
TEST(BadSafetensors, HeaderStartsWithAByteOrderMark) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  const std::string s = slurp(ck.weights);
  uint64_t n = 0;
  std::memcpy(&n, s.data(), 8);
  spit(ck.weights, safetensors_bytes("\xEF\xBB\xBF" + s.substr(8, n), s.substr(8 + n)));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "header starts with a UTF-8 byte order mark"});
}

TEST(BadSafetensors, HeaderNotAnObject) {
  TempDir d;
  spit(d / "w.safetensors", safetensors_bytes("[1, 2]  ", ""));
  expect_input_error([&] { read_safetensors(d / "w.safetensors"); }, {d / "w.safetensors", "header is not a JSON object"});
}

TEST(BadSafetensors, DataOffsetsBeyondData) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  json e = kNormEntry;
  e["data_offsets"] = {0, 1600};
  e["shape"] = {400};
  spit(ck.weights, with_norm_entry(e));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "tensor 'model.norm.weight' data_offsets", "fall outside the"});
}

TEST(BadSafetensors, DataOffsetsReversed) {
  TempDir d;
  json e = kNormEntry;
  e["data_offsets"] = {16, 0};
  spit(d / "w.safetensors", with_norm_entry(e));
  expect_input_error([&] { read_safetensors(d / "w.safetensors"); }, {"tensor 'model.norm.weight' data_offsets", "fall outside"});
}

// The tensors must tile the data exactly, as the safetensors library requires (its Metadata::validate and
// read_metadata refuse the file otherwise, so HF cannot load it): no two sharing bytes, no gap, nothing after the last.
TEST(BadSafetensors, TensorsThatShareBytes) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  json e = kNormEntry;
  e["data_offsets"] = {-16, 0};  // the previous tensor's last 16 bytes; the file's last 16 then belong to no tensor
  spit(ck.weights, with_norm_entry(e));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "tensor 'model.norm.weight' data_offsets", "overlap those of tensor"});
}

TEST(BadSafetensors, BytesAfterTheLastTensor) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  spit(ck.weights, with_norm_entry(kNormEntry) + std::string(64, '\0'));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "64 bytes after the last tensor's data"});
}

TEST(BadSafetensors, GapBeforeATensor) {
  TempDir d;
  json e = kNormEntry;
  e["data_offsets"] = {16, 32};
  std::string s = with_norm_entry(e);
  s.insert(s.size() - 16, std::string(16, '\0'));  // the norm's bytes moved 16 on, after 16 that no tensor names
  spit(d / "w.safetensors", s);
  expect_input_error([&] { read_safetensors(d / "w.safetensors"); },
                     {"tensor 'model.norm.weight' data_offsets", "leave the 16 bytes before it unused"});
}

TEST(BadSafetensors, MetadataValueThatIsNotAString) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  const std::string s = with_norm_entry(kNormEntry);
  uint64_t n = 0;
  std::memcpy(&n, s.data(), 8);
  json h = json::parse(s.substr(8, size_t(n)));
  h["__metadata__"] = {{"format", "pt"}, {"step", 3}};
  spit(ck.weights, safetensors_bytes(h.dump(), s.substr(8 + size_t(n))));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "__metadata__ entry 'step' is not a string"});
}

TEST(BadSafetensors, DataOffsetsDisagreeWithShape) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  json e = kNormEntry;
  e["shape"] = {3};
  spit(ck.weights, with_norm_entry(e));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "tensor 'model.norm.weight' has 16 data bytes, its shape [3] and dtype F32 need 12"});
}

TEST(BadSafetensors, UnknownDtype) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  json e = kNormEntry;
  e["dtype"] = "I32";
  spit(ck.weights, with_norm_entry(e));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "tensor 'model.norm.weight' has dtype I32; only BF16, F16, F32, F64 are weights"});
}

TEST(BadSafetensors, NegativeShape) {
  TempDir d;
  json e = kNormEntry;
  e["shape"] = {-4};
  spit(d / "w.safetensors", with_norm_entry(e));
  expect_input_error([&] { read_safetensors(d / "w.safetensors"); },
                     {"tensor 'model.norm.weight' has a negative or non-integer size in its shape"});
}

TEST(BadSafetensors, ShapeWhoseProductOverflows) {
  TempDir d;
  json e = kNormEntry;
  e["shape"] = {uint64_t(1) << 32, uint64_t(1) << 32, 16};
  spit(d / "w.safetensors", with_norm_entry(e));
  expect_input_error([&] { read_safetensors(d / "w.safetensors"); }, {"tensor 'model.norm.weight' has an absurdly large shape"});
}

TEST(BadSafetensors, DuplicateTensorName) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  std::string s = with_norm_entry(kNormEntry);
  // Same header length: rename the first entry's key to the last one's (both 17 characters).
  const size_t at = s.find("\"model.embed_tokens.weight\"");
  ASSERT_NE(at, std::string::npos);
  const std::string dup = "\"model.norm.weight\"";
  s.replace(at, 27, dup + std::string(27 - dup.size(), ' '));
  spit(ck.weights, s);
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "tensor 'model.norm.weight' appears twice in the header"});
}

// A field given twice within one tensor's entry: nlohmann keeps the last value, so the first dtype (the bytes' true
// one) was read past; the safetensors library refuses the file (a duplicate field of its serde TensorInfo).
TEST(BadSafetensors, DuplicateFieldInATensorsEntry) {
  TempDir d;
  const std::string s = with_norm_entry(kNormEntry);
  uint64_t n = 0;
  std::memcpy(&n, s.data(), 8);
  std::string header = s.substr(8, size_t(n));
  const std::string data = s.substr(8 + size_t(n));
  const size_t at = header.find("\"dtype\":\"F32\"", header.find("\"model.norm.weight\""));
  ASSERT_NE(at, std::string::npos) << header;
  header.insert(at, "\"dtype\":\"BF16\",");
  n = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  spit(d / "w.safetensors", out + header + data);
  expect_input_error([&] { read_safetensors(d / "w.safetensors"); },
                     {"tensor 'model.norm.weight' has 'dtype' twice in its header entry"});
}

TEST(BadSafetensors, MissingTensor) {
  TempDir d;
  const auto ck = write_checkpoint(d, [](TensorMap& w) { w.erase("model.layers.0.post_attention_layernorm.weight"); });
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "missing tensor 'model.layers.0.post_attention_layernorm.weight'"});
}

TEST(BadSafetensors, TruncatedData) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  fs::resize_file(ck.weights, fs::file_size(ck.weights) - 10);
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify", {ck.weights, "data_offsets", "fall outside the"});
}

TEST(BadSafetensors, ShorterThanItsLengthField) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  spit(ck.weights, "abc");
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify", {ck.weights, "file of 3 bytes is too short"});
}

TEST(BadSafetensors, EmptyFile) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  spit(ck.weights, "");
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify", {ck.weights, "empty file"});
}

TEST(BadSafetensors, NaNInBf16Weights) {
  TempDir d;
  const auto ck = write_checkpoint(d, [](TensorMap& w) {
    w["model.layers.1.mlp.down_proj.weight"] = filled(DType::bf16, {4, 6}, std::nan(""));
  });
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "tensor 'model.layers.1.mlp.down_proj.weight' has a non-finite value (nan)"});
}

TEST(BadSafetensors, WeightsOfAnotherWidth) {
  TempDir d;
  const auto ck = write_checkpoint(d, {}, [](json& c) { c["hidden_size"] = 8; });
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights), "verify",
                  {ck.weights, "tensor 'model.embed_tokens.weight' has shape [8, 4], expected [8, 8]"});
}

// ------------------------------------------------------------------------------------------------------
// Sharded checkpoints (model.safetensors.index.json)

namespace {

// The tiny weights split over two shards by name, with the index that maps them.
json write_shards(const TempDir& d) {
  TensorMap a, b;
  json map = json::object();
  for (const auto& [n, t] : tiny_case().model.weights) {
    const bool first = n < "model.layers.1";
    (first ? a : b)[n] = t;
    map[n] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  write_safetensors(d / "model-00001-of-00002.safetensors", a);
  write_safetensors(d / "model-00002-of-00002.safetensors", b);
  json idx = {{"metadata", {{"total_size", 0}}}, {"weight_map", map}};
  spit(d / "model.safetensors.index.json", idx.dump(2));
  spit(d / "config.json", to_config_json(tiny_config()));
  return idx;
}

}  // namespace

TEST(GoodInput, TinyShardedCheckpointPassesVerify) {
  TempDir d;
  write_shards(d);
  const ToolRun r = verify_checkpoint(d, d / "config.json", d.dir.string());
  ASSERT_TRUE(r.exited);
  EXPECT_EQ(r.status, 0) << r.err << r.out;
}

TEST(BadShards, IndexNotJson) {
  TempDir d;
  write_shards(d);
  spit(d / "model.safetensors.index.json", "{\"weight_map\": ");
  expect_rejected(verify_checkpoint(d, d / "config.json", d.dir.string()), "verify",
                  {d / "model.safetensors.index.json", "malformed JSON"});
}

TEST(BadShards, IndexWithoutWeightMap) {
  TempDir d;
  write_shards(d);
  spit(d / "model.safetensors.index.json", "{\"metadata\": {}}");
  expect_rejected(verify_checkpoint(d, d / "config.json", d.dir.string()), "verify",
                  {d / "model.safetensors.index.json", "missing object 'weight_map'"});
}

TEST(BadShards, IndexNamesAMissingShard) {
  TempDir d;
  write_shards(d);
  fs::remove(d / "model-00002-of-00002.safetensors");
  expect_rejected(verify_checkpoint(d, d / "config.json", d.dir.string()), "verify",
                  {d / "model-00002-of-00002.safetensors", "no such file"});
}

TEST(BadShards, IndexPlacesATensorInTheWrongShard) {
  TempDir d;
  json idx = write_shards(d);
  idx["weight_map"][kFinalNormName] = "model-00001-of-00002.safetensors";
  spit(d / "model.safetensors.index.json", idx.dump());
  expect_rejected(verify_checkpoint(d, d / "config.json", d.dir.string()), "verify",
                  {d / "model-00001-of-00002.safetensors", "missing tensor 'model.norm.weight' that the index places in this shard"});
}

// The other direction (found by an adversarial probe, 2026-12-04): a tensor of the first shard that the index
// places in the second. The first shard is read first, and the message said the tensor "is not listed" in an
// index that lists it.
TEST(BadShards, IndexPlacesATensorOfTheFirstShardInTheSecond) {
  TempDir d;
  json idx = write_shards(d);
  idx["weight_map"][kEmbedName] = "model-00002-of-00002.safetensors";
  spit(d / "model.safetensors.index.json", idx.dump());
  const ToolRun r = verify_checkpoint(d, d / "config.json", d.dir.string());
  expect_rejected(r, "verify",
                  {d / "model-00001-of-00002.safetensors",
                   "tensor 'model.embed_tokens.weight' is in this shard, but model.safetensors.index.json places it "
                   "in 'model-00002-of-00002.safetensors'"});
  EXPECT_EQ(r.err.find("is not listed"), std::string::npos) << r.err;
}

TEST(BadShards, ShardHoldsATensorTheIndexDoesNotList) {
  TempDir d;
  json idx = write_shards(d);
  idx["weight_map"].erase(kFinalNormName);
  spit(d / "model.safetensors.index.json", idx.dump());
  expect_rejected(verify_checkpoint(d, d / "config.json", d.dir.string()), "verify",
                  {d / "model-00002-of-00002.safetensors", "tensor 'model.norm.weight' is not listed"});
}

TEST(BadShards, ShardNameLeavesTheDirectory) {
  TempDir d;
  json idx = write_shards(d);
  idx["weight_map"][kFinalNormName] = "../model-00002-of-00002.safetensors";
  spit(d / "model.safetensors.index.json", idx.dump());
  expect_rejected(verify_checkpoint(d, d / "config.json", d.dir.string()), "verify",
                  {"shard name '../model-00002-of-00002.safetensors' must be a plain file name"});
}

TEST(BadShards, DirectoryWithoutWeights) {
  TempDir d;
  spit(d / "config.json", to_config_json(tiny_config()));
  expect_rejected(verify_checkpoint(d, d / "config.json", d.dir.string()), "verify",
                  {d.dir.string(), "directory has neither model.safetensors nor model.safetensors.index.json"});
}

// PyTorch's own formats, which HF and PEFT also save, are named as such (a probe's adapter_model.bin was called a
// safetensors file with an "absurdly large" header, and a directory holding only it "no such file").
TEST(BadShards, PyTorchBinFilesAreNamed) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  std::filesystem::remove(ck.weights);
  spit(d / "pytorch_model.bin", std::string("PK\x03\x04", 4) + std::string(64, 'x'));
  expect_rejected(verify_checkpoint(d, ck.config, d / "pytorch_model.bin"), "verify",
                  {"is a PyTorch pickle/zip file (torch.save), not safetensors"});
  expect_rejected(verify_checkpoint(d, ck.config, d.dir.string()), "verify",
                  {"directory has pytorch_model.bin but no model.safetensors"});
}

// ------------------------------------------------------------------------------------------------------
// PEFT adapters

namespace {

// An adapter directory for the tiny checkpoint: `config` as adapter_config.json, `tensors` as weights.
std::string write_adapter(const TempDir& d, const AdapterConfig& config, const TensorMap& tensors) {
  fs::create_directories(d.dir / "adapter");
  spit(d / "adapter/adapter_config.json", to_adapter_config_json(config));
  write_safetensors(d / "adapter/adapter_model.safetensors", tensors);
  return d / "adapter";
}

}  // namespace

TEST(BadAdapter, RankDiffersFromTensors) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  AdapterConfig a = tiny_adapter(4);
  const std::string dir = write_adapter(d, a, synthetic_adapters(tiny_config(), tiny_adapter(2), 3));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights, {"--adapter", dir}), "verify",
                  {"adapter_model.safetensors", "'model.layers.0.self_attn.q_proj.lora_A.weight' has shape [2, 4], expected [4, 4]"});
}

TEST(BadAdapter, TargetModuleWithoutTensors) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  AdapterConfig a = tiny_adapter();
  a.target_modules.push_back(Proj::k_proj);
  const std::string dir = write_adapter(d, a, synthetic_adapters(tiny_config(), tiny_adapter(), 3));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights, {"--adapter", dir}), "verify",
                  {"adapter_model.safetensors", "missing tensor 'model.layers.0.self_attn.k_proj.lora_A.weight'"});
}

TEST(BadAdapter, TensorsForAnUntargetedModule) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  AdapterConfig wide = tiny_adapter();
  wide.target_modules.push_back(Proj::o_proj);
  const std::string dir = write_adapter(d, tiny_adapter(), synthetic_adapters(tiny_config(), wide, 3));
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights, {"--adapter", dir}), "verify",
                  {"adapter_model.safetensors", "adapter tensor 'model.layers.0.self_attn.o_proj.lora_A.weight'",
                   "target_modules does not list"});
}

// A base weight inside the adapter file used to replace the checkpoint's silently.
TEST(BadAdapter, AdapterFileCarriesABaseWeight) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  TensorMap t = synthetic_adapters(tiny_config(), tiny_adapter(), 3);
  t["base_model.model.model.norm.weight"] = filled(DType::f32, {4}, 0.0);
  const std::string dir = write_adapter(d, tiny_adapter(), t);
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights, {"--adapter", dir}), "verify",
                  {"adapter_model.safetensors", "tensor 'base_model.model.model.norm.weight' is a base weight"});
}

// PEFT writes every adapter key with its 'base_model.model.' prefix. A file with some keys prefixed and some not was
// loaded whole here (the prefix dropped where present), though a loader matching one kind leaves the other's
// adapters at their initialisation (a probe).
TEST(BadAdapter, PrefixedAndUnprefixedNamesMixed) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  TensorMap t;
  for (auto& [n, x] : synthetic_adapters(tiny_config(), tiny_adapter(), 3))
    t.emplace(n.find(".q_proj.") != std::string::npos ? "base_model.model." + n : n, x);
  const std::string dir = write_adapter(d, tiny_adapter(), t);
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights, {"--adapter", dir}), "verify",
                  {"adapter_model.safetensors", "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'",
                   "'model.layers.0.self_attn.v_proj.lora_A.weight'", "with and without PEFT's 'base_model.model.' prefix"});
}

TEST(BadAdapter, AdapterConfigMissing) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  const std::string dir = write_adapter(d, tiny_adapter(), synthetic_adapters(tiny_config(), tiny_adapter(), 3));
  fs::remove(d / "adapter/adapter_config.json");
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights, {"--adapter", dir}), "verify",
                  {"adapter/adapter_config.json", "no such file"});
}

TEST(BadAdapter, AdapterPathMissing) {
  TempDir d;
  const auto ck = write_checkpoint(d);
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights, {"--adapter", d / "nope"}), "verify",
                  {d / "nope", "no such adapter file or directory"});
}

namespace {

AdapterConfig parse_adapter(const std::string& text) {
  return parse_adapter_config_json(text, tiny_config(), "a.json", nullptr);
}

}  // namespace

TEST(BadAdapter, DoraIsRefused) {
  expect_input_error(
      [] { parse_adapter(R"({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_dora": true})"); },
      {"a.json: use_dora = true is not implemented"});
}

TEST(BadAdapter, RankZero) {
  expect_input_error([] { parse_adapter(R"({"r": 0, "lora_alpha": 4, "target_modules": ["q_proj"]})"); },
                     {"a.json: lora rank r = 0 is outside 1..65536"});
}

// PEFT refuses an adapter whose target_modules match no module (an entry matching nothing beside others that
// match is ignored, as by PEFT).
TEST(BadAdapter, UnknownTargetModule) {
  expect_input_error([] { parse_adapter(R"({"r": 2, "lora_alpha": 4, "target_modules": ["qkv"]})"); },
                     {"a.json: target_modules [\"qkv\"] matches no projection"});
}

// ------------------------------------------------------------------------------------------------------
// The command line

TEST(BadFlags, UnknownFlag) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--bogus"}, d), "verify", {"--bogus"});
}

TEST(BadFlags, UnknownModel) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma3-1b"}, d), "verify", {"--model: unknown model 'gemma3-1b'"});
}

TEST(BadFlags, SoftcapBogus) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--softcap", "bogus"}, d), "verify",
                  {"--softcap: 'bogus' is not one of none, attn, logits, attn,logits"});
}

TEST(BadFlags, SoftcapTheConfigDoesNotDefine) {
  TempDir d;
  const auto ck = write_checkpoint(d, {}, [](json& c) { c["attn_logit_softcapping"] = nullptr; });
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights, {"--softcap", "attn"}), "verify",
                  {"--softcap: attention softcap requested but attn_logit_softcapping is null"});
}

TEST(BadFlags, BackendBogus) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--backend", "bogus"}, d), "verify",
                  {"--backend: 'bogus' is not one of reference, fast, both"});
}

TEST(BadFlags, SeqZero) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--seq", "0"}, d), "verify", {"--seq: must be at least 2"});
}

TEST(BadFlags, SeqNotANumber) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--seq", "twelve"}, d), "verify", {"--seq", "twelve"});
}

TEST(BadFlags, BatchNegative) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--batch", "-1"}, d), "verify", {"--batch: must be at least 1, got -1"});
}

// Used to allocate until the kernel's OOM killer ended the process (a signal, no message).
TEST(BadFlags, BatchBeyondMemory) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--batch", "100000000000", "--seq", "64"}, d), "verify",
                  {"--batch and --seq: 100000000000 x 64 tokens need", "GB for the float64 logits alone"});
}

// One sequence's attention caches (every layer's scores and weights, T^2 each) were found by std::bad_alloc inside an
// OpenMP region, which cannot reach main's handler: verify and train aborted with SIGABRT at --seq 100000 on
// gemma2-tiny (found by a probe, 2026-12-05). Refused up front, naming the flag.
TEST(BadFlags, SequenceBeyondMemory) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-tiny", "--seq", "100000", "--backend", "reference"}, d), "verify",
                  {"--seq: a sequence of 100000 tokens needs", "for the float64 reference's attention caches alone"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-tiny", "--seq-len", "100000", "--batch", "1", "--steps", "1"}, d),
                  "train", {"--seq: a sequence of 100000 tokens needs"});
}

TEST(BadFlags, LayersBeyondTheModel) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-27b", "--layers", "99"}, d), "verify", {"--layers: 99 is outside 1..46"});
}

TEST(BadFlags, LayersWithCase) {
  TempDir d;
  expect_rejected(verify_case(d, write_tiny_case(d), {"--layers", "1"}), "verify",
                  {"--layers: does not apply to --case"});
  // The seed makes synthetic weights and batches; a case file fixes both, so a seed there would change nothing.
  expect_rejected(verify_case(d, write_tiny_case(d), {"--seed", "3"}), "verify", {"--seed: does not apply to --case"});
  expect_rejected(run_tool(kVerify, {"diagnose", "--case", write_tiny_case(d), "--seed", "3"}, d), "verify",
                  {"--seed: does not apply to --case"});
  // train's seed also seeds LoRA dropout's masks: with a case file and no dropout it changes no bit.
  expect_rejected(run_tool(kTrain, {"--case", write_tiny_case(d), "--seed", "3", "--backend", "reference"}, d), "train",
                  {"--seed: changes nothing here", "no lora_dropout for it to seed"});
}

TEST(BadFlags, NegativeSeed) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--seed", "-1"}, d), "verify",
                  {"--seed: a seed is a non-negative integer, got -1"});
}

// verify diagnose and make-case read their seeds as verify and train do (a probe: diagnose --seed -1 ran as seed
// 2^64 - 1); make-case's batch is bounded (--batch 0 crashed with SIGSEGV, 1e11 aborted on bad_alloc).
TEST(BadFlags, DiagnoseAndMakeCaseSeedsAndSizes) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"diagnose", "--model", "gemma2-micro", "--seed", "-1"}, d), "verify",
                  {"--seed: a seed is a non-negative integer, got -1"});
  expect_rejected(run_tool(kMakeCase, {"--out", d / "c.h5", "--seed", "-1"}, d), "make-case",
                  {"--seed: a seed is a non-negative integer, got -1"});
  for (const char* b : {"0", "-1", "100000000000"})
    expect_rejected(run_tool(kMakeCase, {"--out", d / "c.h5", "--batch", b}, d), "make-case", {"--batch"});
  expect_rejected(run_tool(kMakeCase, {"--out", d / "c.h5", "--seq", "1"}, d), "make-case", {"--seq: must be in 2.."});
  expect_rejected(run_tool(kMakeCase, {"--out", d / "c.h5", "--lora-r", "-1"}, d), "make-case", {"--lora-r"});
  EXPECT_FALSE(std::filesystem::exists(d / "c.h5"));
}

// Messages that did not name the flag at fault (a probe): --lora-r 2147483648 aborted make-case on std::bad_alloc
// (SIGABRT) and sent train out of memory naming --layers, --seq and --batch; a shape flag the preset cannot take
// was reported as "make-case: make-case: ...", naming neither.
TEST(BadFlags, RankAndShapeFlagsAreNamed) {
  TempDir d;
  expect_rejected(run_tool(kMakeCase, {"--out", d / "c.h5", "--lora-r", "2147483648"}, d), "make-case",
                  {"--lora-r: must be at most 65536", "got 2147483648"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--lora-r", "2147483648"}, d), "train",
                  {"--lora-r: must be at most 65536", "got 2147483648"});
  const ToolRun r = run_tool(kMakeCase, {"--out", d / "c.h5", "--kv-heads", "3"}, d);
  expect_rejected(r, "make-case",
                  {"make-case: --model gemma2-tiny --kv-heads 3: num_attention_heads (4) is not a multiple of "
                   "num_key_value_heads (3)"});
  EXPECT_FALSE(std::filesystem::exists(d / "c.h5"));
}

// CLI11 clamped a seed beyond 2^64 - 1 to 2^64 - 1 without a word (a probe: verify, diagnose and train ran
// --seed 18446744073709551616 as seed 18446744073709551615, make-case wrote its case with it).
TEST(BadFlags, SeedBeyond64BitsInEveryTool) {
  TempDir d;
  const std::vector<std::pair<std::string, std::vector<std::string>>> runs = {
      {kVerify, {"--model", "gemma2-micro"}},
      {kVerify, {"diagnose", "--model", "gemma2-micro"}},
      {kTrain, {"--model", "gemma2-micro", "--max-steps", "1"}},
      {kMakeCase, {"--out", d / "c.h5"}}};
  for (const char* seed : {"18446744073709551616", "99999999999999999999999999", "0x10000000000000000"})
    for (auto [bin, args] : runs) {
      args.insert(args.end(), {"--seed", seed});
      const std::string tool = bin == kMakeCase ? "make-case" : bin == kTrain ? "train" : "verify";
      expect_rejected(run_tool(bin, args, d), tool,
                      {std::string("--seed: a seed is at most 2^64 - 1 = 18446744073709551615, got ") + seed});
    }
  EXPECT_FALSE(std::filesystem::exists(d / "c.h5"));
}

// A data row nested 10^5 deep was quoted whole in its error message: dump() recursed as deep and train died with
// SIGSEGV (a probe; 5 x 10^4 still fit the stack). The value is named by its kind instead.
TEST(BadFlags, TrainDataRowNestedDeep) {
  TempDir d;
  spit(d / "deep.jsonl", "{\"input_ids\": " + std::string(100000, '[') + std::string(100000, ']') + "}\n");
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--data", d / "deep.jsonl", "--max-steps", "1"}, d),
                  "train", {"deep.jsonl:1: input_ids[0] is a list of 1 entries, not an integer"});
}

// An empty value was read as 0 or as the default without a word (a probe trained at learning rate 0 with --lr '',
// saved nothing with --save-adapter ''); '-' was a file named '-' except for --json, the one output that means
// stdout; a --save-adapter that is a file was found out after the last step. All refused before any work.
TEST(BadFlags, EmptyValuesDashAndADirectoryThatIsAFile) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--layers", ""}, d), "verify", {"--layers: empty value"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--lr="}, d), "train", {"--lr: empty value"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--save-adapter", ""}, d), "train",
                  {"--save-adapter: empty value"});
  expect_rejected(run_tool(kMakeCase, {"--out", d / "c.h5", "--seed", ""}, d), "make-case", {"--seed: empty value"});
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--junit", "-"}, d), "verify",
                  {"--junit: '-' (standard output) is not supported here"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--log", "-"}, d), "train",
                  {"--log: '-' (standard output) is not supported here"});
  spit(d / "afile", "x");
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--save-adapter", d / "afile"}, d), "train",
                  {"--save-adapter: '" + d / "afile" + "' exists and is not a directory"});
  EXPECT_FALSE(std::filesystem::exists(d / "-"));
}

TEST(BadFlags, NoInputGiven) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--softcap", "none"}, d), "verify",
                  {"give exactly one of --model, --case, or --config with --weights"});
}

TEST(BadFlags, TwoInputsGiven) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--case", d / "x.h5"}, d), "verify",
                  {"give exactly one of --model, --case, or --config with --weights"});
}

TEST(BadFlags, OutputDirectoryMissing) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--json", d / "no/such/dir/out.json"}, d), "verify",
                  {"--json: cannot write", "directory", "does not exist"});
}

TEST(BadFlags, OutputIsADirectory) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--junit", d.dir.string()}, d), "verify",
                  {"--junit:", "is a directory"});
}

TEST(BadFlags, TwoOutputsToOneFile) {
  TempDir d;
  expect_rejected(run_tool(kVerify, {"--model", "gemma2-micro", "--json", d / "out", "--junit", d / "out"}, d), "verify",
                  {"--junit: '" + d / "out" + "' is also the path of --json"});
}

// An output naming an input's path would replace the input after the run (a probe's --json over its own --case
// turned the case file into JSON; --log over --data overwrote the training data), so it is refused before.
TEST(BadFlags, AnOutputOverAnInput) {
  TempDir d;
  const std::string c = write_tiny_case(d);
  const std::string before = slurp(c);
  expect_rejected(run_tool(kVerify, {"--case", c, "--json", c}, d), "verify",
                  {"--json: '" + c + "' is also the path of the input --case"});
  EXPECT_EQ(slurp(c), before);
  const auto ck = write_checkpoint(d);
  expect_rejected(verify_checkpoint(d, ck.config, ck.weights, {"--dump-grads", ck.weights}), "verify",
                  {"--dump-grads: '" + ck.weights + "' is also the path of the input --weights"});
  spit(d / "rows.jsonl", "{\"input_ids\": [1, 2, 3, 4]}\n");
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--data", d / "rows.jsonl", "--log", d / "rows.jsonl"}, d),
                  "train", {"--log: '" + d / "rows.jsonl" + "' is also the path of the input --data"});
}

// An output that is a symbolic link is written through it (renaming over the link replaced it with a plain file,
// and as root --json /dev/null replaced /dev/null itself: found by a probe). A link to /dev/null here, so that the
// old behaviour only replaces the link.
TEST(BadFlags, AnOutputThroughASymbolicLink) {
  TempDir d;
  std::filesystem::create_symlink(d / "target.json", d / "link.json");
  std::filesystem::create_symlink("/dev/null", d / "null.xml");
  const ToolRun r = run_tool(kVerify, {"--model", "gemma2-micro", "--json", d / "link.json", "--junit", d / "null.xml"}, d);
  ASSERT_TRUE(r.exited);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(std::filesystem::is_symlink(d / "link.json"));
  EXPECT_TRUE(std::filesystem::is_symlink(d / "null.xml"));
  EXPECT_TRUE(std::filesystem::is_character_file("/dev/null"));
  EXPECT_NO_THROW((void)nlohmann::json::parse(slurp(d / "target.json")));
  EXPECT_TRUE(std::filesystem::is_empty(d.dir) == false);
  for (const auto& e : std::filesystem::directory_iterator(d.dir))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
}

// A check's name carries the case file's path, which may hold any bytes: a probe's \x01 and a lone \xff made the
// JUnit file unreadable (xmllint: "invalid character in attribute value", "not proper UTF-8"). Characters XML
// cannot hold become U+FFFD (check::xml_escape); well-formed UTF-8 stays as it is.
TEST(BadFlags, JUnitIsXmlWhateverThePathHolds) {
  TempDir d;
  const std::string odd = d / "ctl\x01x\xff\xc3\xa9.h5";
  std::filesystem::rename(write_tiny_case(d), odd);
  const ToolRun r = verify_case(d, odd, {"--junit", d / "out.xml"});
  ASSERT_TRUE(r.exited);
  ASSERT_LE(r.status, 1) << r.err;
  const std::string x = slurp(d / "out.xml");
  EXPECT_NE(x.find("ctl\xef\xbf\xbdx\xef\xbf\xbd\xc3\xa9.h5"), std::string::npos);
  for (unsigned char c : x) EXPECT_TRUE(c >= 0x20 || c == '\n' || c == '\t' || c == '\r') << int(c);
  EXPECT_EQ(x.find('\xff'), std::string::npos);
}

TEST(BadFlags, TrainMicroBatchesNotDividingTheBatch) {
  TempDir d;
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--batch", "2", "--micro-batches", "3"}, d), "train",
                  {"--micro-batches: 3 does not divide the batch of 2"});
}

TEST(BadFlags, TrainNegativeLearningRate) {
  TempDir d;
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--lr", "-1e-3"}, d), "train", {"--lr: must be 0 or a positive number"});
}

// torch.optim.AdamW refuses these in its constructor; train once ran them (beta2 = 1 ended in NaN, exit 1).
TEST(BadFlags, TrainAdamWValuesTorchRefuses) {
  TempDir d;
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"--adam-beta1", "1.5"}, {"--adam-beta1", "-0.5"}, {"--adam-beta2", "1.0"},
      {"--adam-epsilon", "-1e-8"}, {"--weight-decay", "-0.1"}};
  for (const auto& [flag, value] : bad)
    expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", flag, value}, d), "train",
                    {flag + ": must be", "torch.optim.AdamW"});
}

TEST(BadFlags, TrainWithoutInputNamesItself) {
  TempDir d;
  const ToolRun r = run_tool(kTrain, {"--steps", "1"}, d);
  expect_rejected(r, "train", {"give exactly one of"});
  EXPECT_EQ(r.err.find("verify"), std::string::npos) << "train's message mentions verify: " << r.err;
}

// ------------------------------------------------------------------------------------------------------
// Nothing half-written

namespace {

const std::vector<std::string> kOutputs = {"out.json", "out.xml", "grads.h5"};

std::vector<std::string> output_flags(const TempDir& d) {
  return {"--json", d / kOutputs[0], "--junit", d / kOutputs[1], "--dump-grads", d / kOutputs[2]};
}

// Everything in `d` that is not an input named in `keep`.
std::vector<std::string> leftovers(const TempDir& d, const std::vector<std::string>& keep) {
  std::vector<std::string> r;
  for (const auto& e : fs::directory_iterator(d.dir)) {
    const std::string n = e.path().filename().string();
    if (n == "tool.stdout" || n == "tool.stderr" || std::find(keep.begin(), keep.end(), n) != keep.end()) continue;
    r.push_back(n);
  }
  return r;
}

}  // namespace

TEST(NothingHalfWritten, RejectedCaseLeavesNoOutputs) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.batch.labels[1] = 99; });
  expect_rejected(verify_case(d, p, output_flags(d)), "verify", {p, "labels[0, 1] = 99"});
  EXPECT_EQ(leftovers(d, {"case.h5"}), std::vector<std::string>{});
}

TEST(NothingHalfWritten, RejectedRunKeepsEarlierOutputsUntouched) {
  TempDir d;
  for (const auto& o : kOutputs) spit(d / o, "from an earlier run");
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.batch.input_ids[0] = -5; });
  expect_rejected(verify_case(d, p, output_flags(d)), "verify", {p, "input_ids[0, 0] = -5"});
  for (const auto& o : kOutputs) EXPECT_EQ(slurp(d / o), "from an earlier run") << o;
}

// The last output cannot be written (its temporary name, 10 bytes longer, exceeds NAME_MAX) after the first
// ones were: those are removed again, so a failed run leaves no partial set of results.
TEST(NothingHalfWritten, OutputFailingAfterOthersRemovesThem) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  const std::string long_name = std::string(250, 'j') + ".json";
  const ToolRun r = verify_case(d, p, {"--json", d / long_name, "--junit", d / kOutputs[1], "--dump-grads", d / kOutputs[2]});
  ASSERT_TRUE(r.exited);
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("cannot write"), std::string::npos) << r.err;
  EXPECT_EQ(leftovers(d, {"case.h5"}), std::vector<std::string>{});
}

// train checks its outputs before the run as verify does: a --log in a missing directory once trained every step
// and wrote the adapter before failing; --save-base once wrote the base before a flag checked later refused the run.
TEST(NothingHalfWritten, TrainRefusesAnUnwritableLogBeforeTraining) {
  TempDir d;
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--steps", "2", "--save-adapter", d / "ad", "--log",
                                    d / "no/such/dir/log.json"}, d),
                  "train", {"--log: cannot write", "does not exist"});
  EXPECT_EQ(leftovers(d, {}), std::vector<std::string>{});
}

TEST(NothingHalfWritten, TrainRefusesTwoOutputsOnOnePath) {
  TempDir d;
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--steps", "1", "--log", d / "x", "--report", d / "x"}, d),
                  "train", {"--report: '" + d / "x" + "' is also the path of --log"});
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--steps", "1", "--lora-r", "0", "--save-base", d / "m",
                                    "--output-dir", d / "m"}, d),
                  "train", {"--save-base: '" + d / "m" + "' is also the path of --output-dir"});
  EXPECT_EQ(leftovers(d, {}), std::vector<std::string>{});
}

TEST(NothingHalfWritten, TrainRefusedAfterItsInputsLoadWritesNoBase) {
  TempDir d;
  expect_rejected(run_tool(kTrain, {"--model", "gemma2-micro", "--batch", "2", "--micro-batches", "3", "--save-base",
                                    d / "base"}, d),
                  "train", {"--micro-batches: 3 does not divide the batch of 2"});
  EXPECT_EQ(leftovers(d, {}), std::vector<std::string>{});
}

// A full disk surfaced only at the output stream's final flush, which nothing checked: a truncated adapter was
// renamed into place, trainer_state.json recorded its hash, and train said "saved" with exit 0 (found by a probe,
// 2026-12-05, with strace's fault injection and a full tmpfs). Here a file-size limit (RLIMIT_FSIZE, SIGXFSZ
// ignored, both inherited by the child) makes the adapter's write fail: exit 2 naming the file and the system's
// reason, and nothing of the save left behind.
TEST(NothingHalfWritten, AWriteThatFailsLeavesNoFileOfTheSave) {
  TempDir d;
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  rlimit small = old;
  small.rlim_cur = 8192;  // below gemma2-micro's adapter (r 8), above the run's stdout and stderr
  struct sigaction ign{}, prev{};
  ign.sa_handler = SIG_IGN;
  ASSERT_EQ(sigaction(SIGXFSZ, &ign, &prev), 0);
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  const ToolRun r = run_tool(kTrain, {"--model", "gemma2-micro", "--steps", "1", "--save-adapter", d / "ad"}, d);
  setrlimit(RLIMIT_FSIZE, &old);
  sigaction(SIGXFSZ, &prev, nullptr);
  ASSERT_TRUE(r.exited) << r.err;
  EXPECT_EQ(r.status, 2) << r.err;  // stderr also holds the step's progress line: the error is its last line
  EXPECT_NE(r.err.find("train: " + d / "ad/adapter_model.safetensors: cannot write: File too large"), std::string::npos)
      << r.err;
  EXPECT_EQ(leftovers(d, {"ad"}), std::vector<std::string>{});
  std::error_code ec;
  EXPECT_TRUE(fs::is_empty(d / "ad", ec)) << "files of a failed save are left in " << d / "ad";
}

TEST(NothingHalfWritten, SuccessfulRunWritesEveryOutputAndNoTemporaries) {
  TempDir d;
  const std::string p = write_tiny_case(d);
  const ToolRun r = verify_case(d, p, output_flags(d));
  ASSERT_TRUE(r.exited);
  ASSERT_EQ(r.status, 0) << r.err;
  std::vector<std::string> left = leftovers(d, {"case.h5"});
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"grads.h5", "out.json", "out.xml"}));
  EXPECT_TRUE(json::parse(slurp(d / kOutputs[0]))["pass"].get<bool>());
}

// ------------------------------------------------------------------------------------------------------
// Training stops on a non-finite loss (exit 1), naming the step and micro-batch. (Its gradient twin, which
// also names the tensor, shares the code; no input we found makes a gradient overflow before the loss does.)

// AdamW moves every weight by about lr per step whatever the gradient: at lr 1e300 the second step's
// forward pass overflows.
TEST(TrainStops, NonFiniteLossAfterAHugeStep) {
  TempDir d;
  const ToolRun r = run_tool(kTrain, {"--model", "gemma2-micro", "--lr", "1e300", "--steps", "3", "--micro-batches", "2"}, d);
  ASSERT_TRUE(r.exited) << "signal " << r.status;
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_NE(r.err.find("train: stopped: non-finite loss"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("at step 2, micro-batch 0"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("step    2"), std::string::npos) << "step 2 was logged as if it had finished:\n" << r.out;
}

// A stopped run keeps what it did: --log and --report hold the steps before the stop and the reason (they were written
// only at the end, so a diverged run left neither), and a checkpoint whose float32 values overflowed to inf says
// so (found by a probe, 2026-12-05).
TEST(TrainStops, TheLogAndReportOfAStoppedRunAreWritten) {
  TempDir d;
  const ToolRun r = run_tool(kTrain, {"--model", "gemma2-micro", "--lr", "1e300", "--steps", "3", "--log", d / "log.json",
                                      "--report", d / "r.html", "--save-adapter", d / "ad", "--save-steps", "1"},
                             d);
  ASSERT_TRUE(r.exited) << "signal " << r.status;
  EXPECT_EQ(r.status, 1) << r.err;
  const nlohmann::json log = nlohmann::json::parse(slurp(d / "log.json"));
  EXPECT_EQ(log["steps"].size(), 1u) << log.dump();
  EXPECT_NE(log.value("stopped", std::string()).find("non-finite loss"), std::string::npos) << log.dump();
  EXPECT_NE(slurp(d / "r.html").find("<svg"), std::string::npos);
  EXPECT_NE(r.err.find("train: warning: " + d / "ad/checkpoint-1: "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("beyond float32's range and are saved as inf"), std::string::npos) << r.err;
}

// SIGINT or SIGTERM during a run stops it between steps: --log and --report hold the steps taken and the reason, and
// the status is 128 + the signal (a probe: the signal killed train, and neither file was written).
TEST(TrainStops, ASignalStopsTheRunAndItsLogIsWritten) {
  for (const int sig : {SIGINT, SIGTERM}) {
    TempDir d;
    const pid_t pid = start_tool(kTrain, {"--model", "gemma2-micro", "--steps", "100000", "--log", d / "log.json",
                                          "--report", d / "r.html"},
                                 d);
    ASSERT_GT(pid, 0);
    // Past step 2, so that a step's work has been done and logged before the signal.
    for (int i = 0; i < 600 && slurp(d / "tool.stdout").find("step    2") == std::string::npos; ++i) ::usleep(100000);
    ::kill(pid, sig);
    const ToolRun r = wait_tool(pid, d);
    const std::string name = sig == SIGINT ? "SIGINT" : "SIGTERM";
    ASSERT_TRUE(r.exited) << "killed by signal " << r.status;
    EXPECT_EQ(r.status, 128 + sig) << r.err;
    EXPECT_NE(r.err.find("train: interrupted by " + name + " after step "), std::string::npos) << r.err;
    ASSERT_TRUE(fs::exists(d / "log.json")) << r.err;
    const nlohmann::json log = nlohmann::json::parse(slurp(d / "log.json"));
    EXPECT_GE(log["steps"].size(), 2u) << log.dump();
    EXPECT_NE(log.value("stopped", std::string()).find("interrupted by " + name), std::string::npos) << log.dump();
    EXPECT_NE(slurp(d / "r.html").find("<svg"), std::string::npos);
  }
}

// A case file whose embedding (1e308, finite) overflows the forward pass at the first step.
TEST(TrainStops, NonFiniteLossFromOverflowingWeights) {
  TempDir d;
  const std::string p = write_tiny_case(d, [](CaseFile& cf) { cf.model.weights[kEmbedName] = filled(DType::f64, {8, 4}, 1e308); });
  const ToolRun r = run_tool(kTrain, {"--case", p, "--steps", "2"}, d);
  ASSERT_TRUE(r.exited) << "signal " << r.status;
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_NE(r.err.find("train: stopped: non-finite loss"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("at step 1, micro-batch 0"), std::string::npos) << r.err;
}
