#include "casefile.hpp"

#include <filesystem>
#include <set>

#include "errors.hpp"
#include "h5util.hpp"

namespace gemma {

namespace {

const std::set<std::string> kCombos = {"none", "attn", "logits", "attn_logits"};

H5::H5File open_readonly(const std::string& path) {
  h5::quiet();
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) fail(path, "no such file");
  if (std::filesystem::is_directory(path, ec)) fail(path, "is a directory, expected an HDF5 case file");
  return h5::guard(path, "not a readable HDF5 file", [&] {
    if (!H5::H5File::isHdf5(path)) fail(path, "not an HDF5 file");
    return H5::H5File(path, H5F_ACC_RDONLY);
  });
}

}  // namespace

std::map<std::string, std::string> read_root_attributes(const std::string& path) {
  H5::H5File f = open_readonly(path);
  std::map<std::string, std::string> r;
  h5::guard(path, "reading root attributes", [&] {
    const int n = f.getNumAttrs();
    for (int i = 0; i < n; ++i) {
      H5::Attribute a = f.openAttribute(unsigned(i));
      if (a.getTypeClass() == H5T_STRING) r[a.getName()] = h5::read_string_attr(f, a.getName(), path);
    }
    return 0;
  });
  return r;
}

CaseFile read_case(const std::string& path) {
  H5::H5File f = open_readonly(path);
  CaseFile cf;
  h5::guard(path, "reading case file", [&] {
    if (!f.attrExists("config_json")) fail(path, "missing root attribute 'config_json'");
    cf.model.config = parse_config_json(h5::read_string_attr(f, "config_json", path), path + ": config_json");
    if (f.attrExists("adapter_config_json"))
      cf.model.adapter =
          parse_adapter_config_json(h5::read_string_attr(f, "adapter_config_json", path), path + ": adapter_config_json");

    if (!h5::exists(f, "weights")) fail(path, "missing group '/weights'");
    H5::Group w = f.openGroup("weights");
    for (const auto& name : h5::children(w)) {
      if (w.childObjType(name) != H5O_TYPE_DATASET) fail(path, "'/weights/" + name + "' is not a dataset");
      cf.model.weights[name] = h5::read_float_tensor(w, name, path);
    }

    Shape ids_shape, labels_shape;
    cf.batch.input_ids = h5::read_int_dataset(f, "input_ids", path, ids_shape);
    cf.batch.labels = h5::read_int_dataset(f, "labels", path, labels_shape);
    if (ids_shape.size() != 2) fail(path, "input_ids must be [B, T], has shape " + shape_str(ids_shape));
    if (labels_shape != ids_shape)
      fail(path, "labels shape " + shape_str(labels_shape) + " does not match input_ids shape " + shape_str(ids_shape));
    cf.batch.B = ids_shape[0];
    cf.batch.T = ids_shape[1];

    if (h5::exists(f, "expected")) {
      H5::Group e = f.openGroup("expected");
      const int na = e.getNumAttrs();
      for (int i = 0; i < na; ++i) {
        H5::Attribute a = e.openAttribute(unsigned(i));
        if (a.getTypeClass() == H5T_STRING) cf.provenance[a.getName()] = h5::read_string_attr(e, a.getName(), path);
      }
      for (const auto& combo : h5::children(e)) {
        if (!kCombos.count(combo))
          fail(path, "'/expected/" + combo + "' is not one of none, attn, logits, attn_logits");
        H5::Group g = e.openGroup(combo);
        Expected x;
        if (h5::exists(g, "loss")) x.loss = h5::read_scalar(g, "loss", path);
        if (h5::exists(g, "logits")) x.logits = h5::read_float_tensor(g, "logits", path);
        if (h5::exists(g, "grads")) {
          H5::Group gg = g.openGroup("grads");
          for (const auto& name : h5::children(gg)) x.grads[name] = h5::read_float_tensor(gg, name, path);
        }
        cf.expected[combo] = std::move(x);
      }
    }
    return 0;
  });

  validate_checkpoint(cf.model, path);
  validate_batch(cf.model.config, cf.batch, path);
  if (cf.batch.count_targets() == 0)
    fail(path, "every label is ignored (-100): the mean loss is undefined (0/0)");

  // Expected results must match what the model can produce, or a comparison would be meaningless.
  const Config& c = cf.model.config;
  std::map<std::string, Shape> trainable;
  if (cf.model.adapter) {
    for (const auto& s : adapter_weight_specs(c, *cf.model.adapter)) trainable[s.name] = s.shape;
  } else {
    for (const auto& s : base_weight_specs(c)) trainable[s.name] = s.shape;
  }
  for (auto& [combo, x] : cf.expected) {
    check_softcap_available(c, {combo == "attn" || combo == "attn_logits", combo == "logits" || combo == "attn_logits"},
                            path + ": /expected/" + combo);
    if (x.logits && x.logits->shape != Shape{cf.batch.B, cf.batch.T, c.vocab_size})
      fail(path, "/expected/" + combo + "/logits has shape " + shape_str(x.logits->shape) + ", expected " +
                     shape_str({cf.batch.B, cf.batch.T, c.vocab_size}));
    TensorMap renamed;
    for (auto& [n, t] : x.grads) {
      std::string name = n.rfind("base_model.model.", 0) == 0 ? n.substr(17) : n;
      auto it = trainable.find(name);
      if (it == trainable.end())
        fail(path, "/expected/" + combo + "/grads/" + n + " is not a trainable weight of this case");
      if (t.shape != it->second)
        fail(path, "/expected/" + combo + "/grads/" + n + " has shape " + shape_str(t.shape) + ", expected " +
                       shape_str(it->second));
      renamed[name] = t;
    }
    x.grads = std::move(renamed);
  }
  return cf;
}

void write_case(const std::string& path, const CaseFile& cf) {
  h5::write_atomically(path, [&](H5::H5File& f) {
    h5::write_string_attr(f, "config_json", to_config_json(cf.model.config));
    if (cf.model.adapter) h5::write_string_attr(f, "adapter_config_json", to_adapter_config_json(*cf.model.adapter));
    H5::Group w = f.createGroup("weights");
    for (const auto& [name, t] : cf.model.weights) h5::write_tensor(w, name, t);
    h5::write_ints(f, "input_ids", {cf.batch.B, cf.batch.T}, cf.batch.input_ids);
    h5::write_ints(f, "labels", {cf.batch.B, cf.batch.T}, cf.batch.labels);
    if (!cf.expected.empty() || !cf.provenance.empty()) {
      H5::Group e = f.createGroup("expected");
      for (const auto& [k, v] : cf.provenance) h5::write_string_attr(e, k, v);
      for (const auto& [combo, x] : cf.expected) {
        H5::Group g = e.createGroup(combo);
        if (x.loss) h5::write_scalar(g, "loss", *x.loss);
        if (x.logits) h5::write_tensor(g, "logits", *x.logits);
        if (!x.grads.empty()) {
          H5::Group gg = g.createGroup("grads");
          for (const auto& [n, t] : x.grads) h5::write_tensor(gg, n, t);
        }
      }
    }
  });
}

}  // namespace gemma
