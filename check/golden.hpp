// Goldens: what the float64 reference computed for a recipe (preset, shape, seed, softcap), kept small and
// with provenance, so that verify can tell a kernel project in one command whether its numerics still match.
// Weights are never stored: synthetic weights regenerate bit-exactly from the recipe (model/synthetic.hpp).
// Small gradients are stored whole; large ones as a sketch (norm and 16 random signed sums), which any
// error of relative size e in the tensor moves by about e.
#pragma once
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "reference/run.hpp"
#include "check/inputs.hpp"
#include "check/report.hpp"

namespace gemma::check {

struct GoldenRecipe {
  std::string model;  // preset
  int64_t layers = 0, batch = 0, seq = 0, lora_r = 0;
  uint64_t seed = 0;
  Softcap softcap;

  std::string file_name() const;  // "gemma2-27b_lora8_attn_logits.h5"
  InputSpec input_spec() const;
  bool operator==(const GoldenRecipe&) const = default;
};

// The goldens the project keeps: every preset at verify's defaults with LoRA, and the test-sized presets also
// with every weight trainable, each for all four softcap combinations.
std::vector<GoldenRecipe> standard_goldens();
// The recipe a verify run corresponds to (its inputs as verify would build them), if it is a synthetic run.
std::optional<GoldenRecipe> recipe_of(const InputSpec& spec, Softcap sc);

inline constexpr const char* kGoldenDir = "goldens/reference";
inline constexpr const char* kManifest = "goldens/MANIFEST.json";
inline constexpr int kSketchSize = 16;
inline constexpr int64_t kStoreWhole = 4096;  // gradients up to this many elements are stored whole

struct Sketch {
  double norm = 0;
  std::vector<double> proj;  // kSketchSize signed sums
};
Sketch sketch_of(const std::string& name, const std::vector<double>& g);

struct Golden {
  GoldenRecipe recipe;
  double loss = 0;
  int64_t tokens = 0;
  std::vector<int64_t> logit_rows, logit_cols;  // selected rows of the flattened batch, selected vocab columns
  std::vector<double> logits;                   // rows x cols, after the final cap (if on)
  std::map<std::string, std::vector<double>> grads;  // small gradients, whole
  std::map<std::string, Sketch> sketches;            // large gradients
  std::map<std::string, std::string> provenance;     // generator, versions, date, command
};

// Selects the logit rows and columns and summarises the gradients of a reference run.
Golden golden_from(const GoldenRecipe& recipe, const Batch& batch, int64_t vocab, const ref::Output& out);
void write_golden(const std::string& path, const Golden& g);
Golden read_golden(const std::string& path);

// Tolerances of the reference backend against a golden: both sides are float64 runs of the same code, so
// only rounding of different operation orders (other thread counts, other BLAS blocking) separates them.
struct GoldenTolerances {
  double loss = 1e-12, logits = 1e-12, grads = 1e-10;
  std::string why = "float64 vs float64 golden: operation-order rounding only (measured <= 1e-14)";
};
// One check per quantity: loss, logits, each gradient (rel L2) or sketch (rel error of norm and sums).
void compare_golden(Report& r, const std::string& prefix, const Golden& expected, const Golden& actual,
                    const GoldenTolerances& tol);

std::string sha256_file(const std::string& path);
// Throws InputError naming the golden when it is not in the manifest or its hash differs.
void check_manifest(const std::string& golden_path);
// Records (or replaces) the manifest entry of a file with its hash and provenance.
void record_in_manifest(const std::string& path, const std::map<std::string, std::string>& provenance);

}  // namespace gemma::check
