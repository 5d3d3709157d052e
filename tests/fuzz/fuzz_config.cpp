// libFuzzer harness: config.json and adapter_config.json text. Both parsers must return a valid config or
// throw InputError; any other exception, crash or sanitizer report is a finding. A config that parses must
// survive its own round trip (to_config_json, parse again) unchanged, or verify would describe a model
// other than the one it ran.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "model/checkpoint.hpp"
#include "model/errors.hpp"

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
    const AdapterConfig a = parse_adapter_config_json(text, "adapter_config.json");
    const AdapterConfig back = parse_adapter_config_json(to_adapter_config_json(a), "round trip");
    if (back.r != a.r || back.lora_alpha != a.lora_alpha || back.target_modules != a.target_modules ||
        back.use_rslora != a.use_rslora)
      std::abort();
  } catch (const InputError&) {
  }
  return 0;
}
