"""Deliberately broken Gemma 2 models for tools/torch_case.py --factory: each is transformers' Gemma2ForCausalLM
where transformers is installed (config is then its Gemma2Config), else tools/gemma2_torch.py's plain-torch model,
with one known bug of docs/model.md patched in the way a kernel author might. verify must fail their results and
name the bug's fingerprint (tests/test_torch_case.sh, tools/torch_gate_runs.sh).
"""


def _model(config, case):
    if type(config).__name__ == "Gemma2Config":
        from transformers import Gemma2ForCausalLM
        return Gemma2ForCausalLM(config)
    from gemma2_torch import Gemma2ForCausalLM
    return Gemma2ForCausalLM(config)


def no_attn_softcap(config, case):
    """no-attn-softcap: the attention scores go into the softmax uncapped (HF's sdpa and flash paths did this)."""
    model = _model(config, case)
    layers = [m for m in model.modules() if hasattr(m, "attn_logit_softcapping")]
    if not layers:
        raise RuntimeError("no module has attn_logit_softcapping: this transformers is shaped differently")
    for m in layers:
        m.attn_logit_softcapping = None
    return model


def no_final_softcap(config, case):
    """no-logit-softcap: the final logits, and so the loss, without the final cap (a fused cross-entropy that
    forgot it)."""
    model = _model(config, case)
    model.config.final_logit_softcapping = None
    return model
