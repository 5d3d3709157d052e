// libFuzzer harness: config.json and adapter_config.json text. Both parsers must return a valid config or
// throw InputError; any other exception, crash or sanitizer report is a finding. A config that parses must
// survive its own round trip (to_config_json, parse again) unchanged, or verify would describe a model
// other than the one it ran.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "model/checkpoint.hpp"
#include "model/errors.hpp"
#include "tests/tiny_case.hpp"

using namespace gemma;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const Config c = parse_config_json(text, "config.json", nullptr);
    const Config back = parse_config_json(to_config_json(c), "round trip", nullptr);
    if (back.vocab_size != c.vocab_size || back.num_hidden_layers != c.num_hidden_layers ||
        back.layer_types != c.layer_types || back.sliding_window != c.sliding_window ||
        back.attn_logit_softcapping != c.attn_logit_softcapping ||
        back.final_logit_softcapping != c.final_logit_softcapping || back.rope_theta != c.rope_theta ||
        back.query_pre_attn_scalar != c.query_pre_attn_scalar || back.head_dim != c.head_dim)
      std::abort();
    (void)base_weight_specs(c);
  } catch (const InputError&) {
  }
  try {
    // Resolved against the tiny test model: its modules are what PEFT's rules select among.
    const Config c = test::tiny_config();
    const AdapterConfig a = parse_adapter_config_json(text, c, "adapter_config.json", nullptr);
    const AdapterConfig back = parse_adapter_config_json(to_adapter_config_json(a), c, "round trip", nullptr);
    if (back.use_rslora != a.use_rslora || back.lora_dropout != a.lora_dropout) std::abort();
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      for (Proj p : kAllProj) {
        const LoraModule x = a.module(l, p), y = back.module(l, p);
        if (x.r != y.r || x.lora_alpha != y.lora_alpha || x.scaling != y.scaling) std::abort();
      }
  } catch (const InputError&) {
  }
  return 0;
}
