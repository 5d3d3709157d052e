#!/usr/bin/env python3
"""Independent cross-check of the Gemma 2 float64 reference against Hugging Face transformers.

Computes, with transformers' own Gemma2 code run in float64 on the CPU, the expected loss, logits and
gradients of a case file (HDF5, layout in docs/formats.md) and writes them to its
/expected/<combo>/ group, so that the C++ reference can be checked against code it shares nothing with.

    hf_crosscheck.py fill CASE.h5 [--out OUT.h5] [--shipped] [--combos none,attn,logits,attn_logits]
    hf_crosscheck.py make-cases OUTDIR --count N --seed S [--shipped]

By default ("patched") the places where HF computes in float32 even inside a float64 model are replaced by
float64 versions of the same formulas: Gemma2RMSNorm.forward (x.float()), the rotary embedding (inv_freq,
cos and sin in float32), eager_attention_forward (softmax with dtype=float32) and the causal-LM loss
(logits.float() before the cross-entropy). With --shipped HF runs exactly as released, which shows how far
HF-as-shipped is from float64. Every run is also compared with a second, plain-torch float64
implementation of docs/model.md written here; in patched mode they must agree to 1e-12.

make-cases writes case_000.h5, ... (tiny random models covering GQA 1/2/4, query_pre_attn_scalar != head_dim,
T > sliding window, ignored labels, LoRA subsets with and without rsLoRA, old and new config key styles, an
odd vocabulary) and fills each. Their input_ids avoid pad_token_id 0: HF builds nn.Embedding(padding_idx=0),
which drops that row's lookup gradient (the C++ reference follows HF there; fill notes it when it happens).

Needs torch, transformers 5.x, peft (only for adapter cases), h5py and numpy; no network.
Exit status: 0 ok, 1 the self-check failed, 2 bad input (one line on stderr). A transformers or peft that
is not shaped as this script expects raises PatchError (traceback, exit 1) rather than computing quietly.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
from collections import Counter

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from gemma2_case import (ATTN_PROJ, COMBOS, NORMS, PROJ, CaseError, CheckFailed, _atomic_target, _finish,
                         build_hf_config, combo_caps, parse_config, proj_shape, read_case, write_expected)

TOL_LOSS = 1e-12   # patched HF vs the plain-torch self-check, relative
TOL_ARRAY = 1e-10  # same for logits and gradients, norm-wise relative
COUNTS = Counter()  # calls into the patched functions: proves they are what actually ran
_PATCH = {"mode": None}



class PatchError(RuntimeError):
    """The installed transformers/peft is not shaped the way this script expects."""


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Reading and validating a case
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# float64 replacements of HF's float32 islands (same formulas, no downcast)
# ----------------------------------------------------------------------------------------------------------

def _rmsnorm_forward64(self, x):
    COUNTS["rmsnorm"] += 1
    x64 = x.to(torch.float64)
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * (1.0 + self.weight.to(torch.float64))).type_as(x)


def _rope_init64(config=None, device=None, seq_len=None, *args, **kwargs):
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        raise PatchError(f"expected transformers 5.x config.rope_parameters with rope_theta, got {rp!r}")
    if rp.get("rope_type", "default") != "default" or rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise PatchError(f"only default full RoPE is patched, got {rp!r}")
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float64) / dim
    return 1.0 / (float(rp["rope_theta"]) ** exponent), 1.0


@torch.no_grad()
def _rope_forward64(self, x, position_ids, *args, **kwargs):
    COUNTS["rope"] += 1
    inv = self.inv_freq.to(device=x.device, dtype=torch.float64)
    freqs = position_ids.to(device=x.device, dtype=torch.float64)[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = float(self.attention_scaling)
    return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def _repeat_kv(t, n):
    b, kv, s, d = t.shape
    return t if n == 1 else t[:, :, None].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)


def _eager_attention64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    COUNTS["attn"] += 1
    if scaling is None:
        scaling = module.head_dim ** -0.5
    key = _repeat_kv(key, module.num_key_value_groups)
    value = _repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        if query.shape[2] > 1:
            raise PatchError("eager attention got no mask: HF relied on something else for causality")
    elif attention_mask.dtype == torch.bool:
        raise PatchError("eager attention got a boolean mask, expected HF's additive float mask")
    else:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = F.softmax(scores, dim=-1, dtype=torch.float64).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _causal_lm_loss64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kw):
    COUNTS["loss"] += 1
    if num_items_in_batch is not None:
        raise PatchError("loss called with num_items_in_batch; this script expects a plain mean")
    logits = logits.to(torch.float64)  # HF does logits.float(), which is a downcast in a float64 model
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                           ignore_index=ignore_index, reduction="mean")


PATCH_SENTENCE = ("transformers' Gemma2RMSNorm.forward, Gemma2RotaryEmbedding.forward (with "
                  "compute_default_rope_parameters for inv_freq) and modeling_gemma2.eager_attention_forward were "
                  "replaced by float64 versions of the same formulas, and LOSS_MAPPING['ForCausalLM'] by the same "
                  "shifted mean cross-entropy without the logits.float() downcast")


def install_patches(shipped):
    if _PATCH["mode"] is not None:
        if _PATCH["mode"] != shipped:
            raise RuntimeError("patched and shipped modes cannot be mixed in one process")
        return
    import transformers.loss.loss_utils as lu
    import transformers.models.gemma2.modeling_gemma2 as mg
    for name in ("Gemma2RMSNorm", "Gemma2RotaryEmbedding", "Gemma2ForCausalLM", "eager_attention_forward"):
        if not hasattr(mg, name):
            raise PatchError(f"transformers.models.gemma2.modeling_gemma2.{name} not found")
    original_eager = mg.eager_attention_forward
    if shipped:
        def counted_eager(*args, **kwargs):  # counts only, so that we know eager is what ran
            COUNTS["attn"] += 1
            return original_eager(*args, **kwargs)
        mg.eager_attention_forward = counted_eager
    else:
        if not callable(getattr(mg.Gemma2RotaryEmbedding, "compute_default_rope_parameters", None)):
            raise PatchError("Gemma2RotaryEmbedding.compute_default_rope_parameters not found (transformers 5.x?)")
        if "ForCausalLM" not in getattr(lu, "LOSS_MAPPING", {}):
            raise PatchError("transformers.loss.loss_utils.LOSS_MAPPING['ForCausalLM'] not found")
        mg.Gemma2RMSNorm.forward = _rmsnorm_forward64
        mg.Gemma2RotaryEmbedding.forward = _rope_forward64
        mg.Gemma2RotaryEmbedding.compute_default_rope_parameters = staticmethod(_rope_init64)
        mg.eager_attention_forward = _eager_attention64
        lu.LOSS_MAPPING["ForCausalLM"] = _causal_lm_loss64
    _PATCH.update(mode=shipped, mg=mg)


# ----------------------------------------------------------------------------------------------------------
# The HF run
# ----------------------------------------------------------------------------------------------------------


def _check_patched_model(mg, model, s):
    norms = [m for m in model.modules() if isinstance(m, mg.Gemma2RMSNorm)]
    if len(norms) != 4 * s.L + 1 or any(type(m).forward is not _rmsnorm_forward64 for m in norms):
        raise PatchError(f"expected {4 * s.L + 1} Gemma2RMSNorm modules running the float64 forward")
    ropes = [m for m in model.modules() if isinstance(m, mg.Gemma2RotaryEmbedding)]
    want = 1.0 / (s.theta ** (torch.arange(0, s.hd, 2, dtype=torch.float64) / s.hd))
    for m in ropes:
        if type(m).forward is not _rope_forward64 or getattr(m, "rope_type", "default") != "default":
            raise PatchError("Gemma2RotaryEmbedding does not run the float64 forward")
        if m.inv_freq.dtype != torch.float64 or not torch.equal(m.inv_freq, want) or float(m.attention_scaling) != 1.0:
            raise PatchError("Gemma2RotaryEmbedding.inv_freq is not the float64 1/theta^(2k/hd) "
                             "(compute_default_rope_parameters patch not used by this transformers)")
    if not ropes:
        raise PatchError("no Gemma2RotaryEmbedding module in the model")
    if mg.eager_attention_forward is not _eager_attention64:
        raise PatchError("modeling_gemma2.eager_attention_forward was replaced behind our back")


def run_hf(case, attn_cap, final_cap):
    s, mg = case.spec, _PATCH["mg"]
    cfg = build_hf_config(s, attn_cap, final_cap)
    torch.manual_seed(0)  # HF's random init is overwritten, but keep the run reproducible anyway
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = mg.Gemma2ForCausalLM(cfg).to(torch.float64)
        if model.config._attn_implementation != "eager":
            raise PatchError(f"model runs attention '{model.config._attn_implementation}', not eager")
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.tie_weights()
            if model.lm_head.weight is not model.model.embed_tokens.weight:
                raise PatchError("lm_head.weight is not tied to model.embed_tokens.weight")
        own = model.state_dict()
        buffers = {n for n, _ in model.named_buffers()}
        sd = {n: torch.from_numpy(a) for n, a in case.base.items()}
        if "lm_head.weight" in own:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        for n in own:
            if n in buffers and n not in sd:
                sd[n] = own[n]  # persistent buffers, if any: keep HF's own
        model.load_state_dict(sd, strict=True)
        model.eval()
        runner = model
        if case.lora:
            runner = _attach_lora(model, case)
        elif not all(p.requires_grad for p in model.parameters()):
            raise PatchError("some base parameters do not require grad")
        runner.eval()
    finally:
        torch.set_default_dtype(previous)
    if not all(p.dtype == torch.float64 for p in runner.parameters()):
        raise PatchError("some parameters are not float64")
    if not _PATCH["mode"]:
        _check_patched_model(mg, model, s)
    COUNTS.clear()
    ids, labels = torch.from_numpy(case.ids), torch.from_numpy(case.labels)
    extra = {}
    if case.position_ids is not None:
        extra["position_ids"] = torch.from_numpy(case.position_ids)
    if case.attention_mask is not None:
        extra["attention_mask"] = torch.from_numpy(case.attention_mask)
    # use_cache=False, as in training: with a cache, transformers does not look for packed rows in position_ids
    # (masking_utils._preprocess_mask_arguments), and packed documents would attend to each other.
    out = runner(input_ids=ids, labels=labels, use_cache=False, **extra)
    if COUNTS["attn"] != s.L:
        raise PatchError(f"eager_attention_forward ran {COUNTS['attn']} times for {s.L} layers: not eager?")
    if not _PATCH["mode"]:
        if COUNTS["rmsnorm"] != 4 * s.L + 1 or COUNTS["rope"] < 1 or COUNTS["loss"] != 1:
            raise PatchError(f"patched functions were not all used: {dict(COUNTS)}")
        if out.loss.dtype != torch.float64 or out.logits.dtype != torch.float64:
            raise PatchError(f"loss {out.loss.dtype} / logits {out.logits.dtype} are not float64")
    out.loss.backward()
    grads = {}
    if case.lora:
        for mod in sorted(case.lora):
            m = model.get_submodule(mod)
            for ab, layer in (("A", m.lora_A["default"]), ("B", m.lora_B["default"])):
                grads[f"{mod}.lora_{ab}.weight"] = layer.weight.grad
    else:
        for name in sorted(case.base):
            grads[name] = model.get_parameter(name).grad
    missing = [n for n, g in grads.items() if g is None]
    if missing:
        raise PatchError(f"no gradient reached {missing[:3]}")
    return {"loss": float(out.loss.item()), "loss_dtype": str(out.loss.dtype).replace("torch.", ""),
            "logits": out.logits.detach().to(torch.float64).numpy(),
            "grads": {n: g.detach().to(torch.float64).numpy() for n, g in grads.items()}}


def _attach_lora(model, case):
    import peft
    a = case.adapter
    config = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, target_modules=a.target_modules, use_rslora=a.use_rslora,
                             lora_dropout=0.0, bias="none")
    peft_model = peft.get_peft_model(model, config)  # model is modified in place; adapter name "default"
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    if adapted != set(case.lora):
        raise CaseError(f"adapter_config_json target_modules adapt {sorted(adapted - set(case.lora))[:3]} without "
                        f"tensors, or tensors exist for unadapted {sorted(set(case.lora) - adapted)[:3]}")
    with torch.no_grad():
        for mod, ab in case.lora.items():
            m = model.get_submodule(mod)
            m.lora_A["default"].weight.copy_(torch.from_numpy(ab["A"]))
            m.lora_B["default"].weight.copy_(torch.from_numpy(ab["B"]))
            if m.scaling["default"] != a.scaling:
                raise PatchError(f"{mod}: PEFT scaling {m.scaling['default']} != expected {a.scaling}")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if len(trainable) != 2 * len(case.lora) or not all(".lora_A.default." in n or ".lora_B.default." in n
                                                        for n in trainable):
        raise PatchError(f"PEFT left other parameters trainable: {trainable[:4]}")
    return peft_model


# ----------------------------------------------------------------------------------------------------------
# Independent plain-torch float64 implementation of docs/model.md (no HF code)
# ----------------------------------------------------------------------------------------------------------

def run_reference(case, attn_cap, final_cap):
    s, f64 = case.spec, torch.float64
    w = {n: torch.tensor(a, dtype=f64, requires_grad=not case.lora) for n, a in case.base.items()}
    lora = {m: {k: torch.tensor(v, dtype=f64, requires_grad=True) for k, v in ab.items()} for m, ab in case.lora.items()}
    scaling = case.adapter.scaling if case.adapter else 0.0
    ids, labels = torch.from_numpy(case.ids), torch.from_numpy(case.labels)
    B, T = ids.shape

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.eps) * (1.0 + weight)

    def linear(x, mod):
        y = x @ w[mod + ".weight"].T
        if mod in lora:
            y = y + ((x @ lora[mod]["A"].T) @ lora[mod]["B"].T) * scaling
        return y

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    pos = torch.from_numpy(case.position_ids) if case.position_ids is not None else torch.arange(T).expand(B, T)
    angle = pos.to(f64)[..., None] * (1.0 / (s.theta ** (torch.arange(0, s.hd, 2, dtype=f64) / s.hd)))
    cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]  # [B, 1, T, hd]
    half = s.hd // 2

    def rope(t):  # [B, heads, T, hd], half-split rotate_half convention
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    # Visibility [B, 1, T, T]: causal, within the window on sliding layers, and, the spec's packing and padding
    # rules: with position_ids and no attention mask, a document starts wherever the position is not its
    # predecessor's + 1, and a token sees its own document only; a padding key is never seen.
    qi, kj = torch.arange(T)[:, None], torch.arange(T)[None, :]
    extra_mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    if case.position_ids is not None and case.attention_mask is None:
        diff = torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1)
        doc = (diff != 1).cumsum(-1)
        extra_mask &= (doc[:, :, None] == doc[:, None, :])[:, None]
    if case.attention_mask is not None:
        extra_mask &= torch.from_numpy(case.attention_mask).bool()[:, None, None, :]
    causal = (kj <= qi) & extra_mask
    window = causal & (qi - kj <= s.W - 1)
    kv_of_head = torch.div(torch.arange(s.H), s.H // s.KV, rounding_mode="floor")

    x = w["model.embed_tokens.weight"][ids] * math.sqrt(s.D)
    for l in range(s.L):
        p = f"model.layers.{l}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = linear(h, p + "self_attn.q_proj").view(B, T, s.H, s.hd).transpose(1, 2)
        k = linear(h, p + "self_attn.k_proj").view(B, T, s.KV, s.hd).transpose(1, 2)
        v = linear(h, p + "self_attn.v_proj").view(B, T, s.KV, s.hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k[:, kv_of_head], v[:, kv_of_head]
        sc = (q @ k.transpose(-1, -2)) * (s.qpas ** -0.5)
        if attn_cap is not None:
            sc = attn_cap * torch.tanh(sc / attn_cap)
        visible = window if s.layer_types[l] == "sliding_attention" else causal
        # A query that sees no key (left padding) gets a zero output here; it never reaches a scored position.
        prob = torch.softmax(sc.masked_fill(~visible, float("-inf")), dim=-1)
        prob = torch.where(visible.any(-1, keepdim=True), prob, torch.zeros_like(prob))
        o = (prob @ v).transpose(1, 2).reshape(B, T, s.H * s.hd)
        x = x + rms(linear(o, p + "self_attn.o_proj"), w[p + "post_attention_layernorm.weight"])
        h = rms(x, w[p + "pre_feedforward_layernorm.weight"])
        m = linear(gelu_tanh(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        x = x + rms(m, w[p + "post_feedforward_layernorm.weight"])
    logits = rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T
    if final_cap is not None:
        logits = final_cap * torch.tanh(logits / final_cap)
    z, y = logits[:, :-1].reshape(-1, s.V), labels[:, 1:].reshape(-1)
    keep = y != -100
    zk = z[keep]
    loss = (torch.logsumexp(zk, -1) - zk.gather(1, y[keep][:, None])[:, 0]).sum() / keep.sum()
    loss.backward()
    if case.lora:
        grads = {f"{m}.lora_{k}.weight": t.grad for m, ab in lora.items() for k, t in ab.items()}
    else:
        grads = {n: t.grad for n, t in w.items()}
    return {"loss": float(loss.item()), "logits": logits.detach().numpy(),
            "grads": {n: g.numpy() for n, g in grads.items()}}


def compare(case, hf, ref):
    """Relative differences HF vs the independent implementation; the pad row is handled separately."""
    rel = lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
    loss_rel = abs(hf["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-300)
    # Logits at padding positions are left out: HF's eager attention spreads a query that sees no key uniformly over
    # every key (its mask adds the dtype's minimum, not -inf), the self-check gives it a zero output; neither
    # reaches the loss.
    real = np.ones(case.ids.shape, dtype=bool) if case.attention_mask is None else case.attention_mask.astype(bool)
    logits_rel = rel(hf["logits"][real], ref["logits"][real])
    if set(hf["grads"]) != set(ref["grads"]):
        raise CheckFailed(f"gradient names differ: {sorted(set(hf['grads']) ^ set(ref['grads']))[:4]}")
    worst, note = ("", 0.0), None
    pad = case.spec.pad
    for name in sorted(hf["grads"]):
        a, b = hf["grads"][name], ref["grads"][name]
        if name == "model.embed_tokens.weight" and pad is not None and np.any(case.ids == pad):
            # HF builds nn.Embedding(padding_idx=pad_token_id): that row gets no lookup gradient
            note = (f"input_ids contain pad_token_id {pad}: HF's expected gradient of model.embed_tokens.weight row "
                    f"{pad} omits the lookup contribution (nn.Embedding padding_idx), unlike the spec; the self-check "
                    f"compares the other rows only", rel(a[pad], b[pad]))
            a, b = np.delete(a, pad, axis=0), np.delete(b, pad, axis=0)
        r = rel(a, b)
        if r >= worst[1]:
            worst = (name, r)
    return loss_rel, logits_rel, worst, note


# ----------------------------------------------------------------------------------------------------------
# fill
# ----------------------------------------------------------------------------------------------------------

def _versions():
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
            "peft_version": peft_version, "python_version": platform.python_version()}


def fill_case(path, out_path, shipped, combos, command):
    case = read_case(path)
    s = case.spec
    caps = {c: combo_caps(s, c) for c in combos}
    install_patches(shipped)
    mode = "shipped" if shipped else "patched"
    lora_txt = (f" lora r={case.adapter.r} alpha={case.adapter.alpha} rslora={case.adapter.use_rslora} "
                f"on {len(case.lora)} modules" if case.lora else "")
    log(f"{path}: V={s.V} D={s.D} I={s.I} L={s.L} H={s.H} KV={s.KV} hd={s.hd} qpas={s.qpas} W={s.W} "
        f"B,T={case.ids.shape[0]},{case.ids.shape[1]}{lora_txt}  [HF float64 {mode}]")
    results, notes, diffs = {}, set(), []
    for combo in combos:
        attn_cap, final_cap = caps[combo]
        hf = run_hf(case, attn_cap, final_cap)
        ref = run_reference(case, attn_cap, final_cap)
        loss_rel, logits_rel, worst, note = compare(case, hf, ref)
        if note:
            notes.add(note[0])
            log(f"  note: {note[0]} (row {s.pad} differs by {note[1]:.3e} relative)")
        log(f"  [{combo:11s}] HF loss {hf['loss']:.17g} ({hf['loss_dtype']})  self-check {ref['loss']:.17g}  "
            f"rel diff {loss_rel:.2e}  logits {logits_rel:.2e}  grads {worst[1]:.2e} ({worst[0]})")
        if not shipped and (loss_rel > TOL_LOSS or logits_rel > TOL_ARRAY or worst[1] > TOL_ARRAY):
            raise CheckFailed(f"{path} [{combo}]: patched HF and the independent float64 implementation differ "
                              f"(loss {loss_rel:.2e} > {TOL_LOSS:g}, or logits {logits_rel:.2e} / grads "
                              f"{worst[1]:.2e} > {TOL_ARRAY:g}): a patch did not take effect or semantics differ")
        hf["attrs"] = {"selfcheck_rel_diff": f"loss {loss_rel:.3e}, logits {logits_rel:.3e}, grads {worst[1]:.3e}",
                       "hf_loss_dtype": hf["loss_dtype"]}
        diffs.append(f"{combo}: {loss_rel:.3e}")
        results[combo] = hf
    attrs = dict(_versions())
    attrs.update(expected_kind=f"hf-float64-{mode}", generator="tools/hf_crosscheck.py", command=command,
                 date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 patches="none (HF as shipped)" if shipped else PATCH_SENTENCE,
                 selfcheck_rel_diff="; ".join(diffs) + " (relative loss difference to an independent plain-torch "
                                    "float64 implementation of docs/model.md)")
    if notes:
        attrs["notes"] = " ".join(sorted(notes))
    write_expected(path, out_path, results, attrs)
    log(f"  wrote /expected ({', '.join(combos)}) to {out_path}")
    return results




# ----------------------------------------------------------------------------------------------------------
# make-cases
# ----------------------------------------------------------------------------------------------------------

def generate_case(i, rng):
    """Tiny random Gemma 2, scaled so that both softcaps bite; the feature mix cycles with i."""
    groups = (1, 2, 4)[i % 3]
    L = (2, 3, 1, 1, 2, 3, 3, 1, 2)[i % 9]  # every (groups, L) pair once per 9 cases
    KV = int(rng.integers(1, 3))
    H, hd = KV * groups, 2 * int(rng.integers(2, 9))
    # transformers 5 refuses a hidden size that is not a multiple of the head count (even though Gemma 2
    # itself decouples head_dim from hidden / heads): round D up to one.
    D, I = int(rng.integers(16, 49)), int(rng.integers(32, 97))
    D = -(-D // H) * H
    V = 97 if i == 0 else int(rng.integers(64, 161))
    W, T, B = int(rng.integers(3, 7)), int(rng.integers(8, 17)), int(rng.integers(1, 4))
    if i % 4 == 3:
        qpas = hd
    else:
        qpas = int(rng.choice([c for c in {2 * hd, hd // 2, max(1, D // H), int(rng.integers(4, 65))} if c != hd]))
    old_style, use_lora = i % 2 == 0, (i // 2) % 2 == 1
    attn_cap, final_cap = (20.0, 10.0) if i % 5 == 4 else (50.0, 30.0)
    theta = float(rng.choice([10000.0, 10000.0, 500.0]))
    cfg = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": V, "hidden_size": D,
           "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
           "head_dim": hd, "query_pre_attn_scalar": qpas, "sliding_window": W, "attn_logit_softcapping": attn_cap,
           "final_logit_softcapping": final_cap, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
           "max_position_embeddings": 8192, "tie_word_embeddings": True, "attention_bias": False,
           "attention_dropout": 0.0, "initializer_range": 0.02, "pad_token_id": 0, "eos_token_id": 1,
           "bos_token_id": 2, "use_cache": True}
    if old_style:
        cfg.update(rope_theta=theta, hidden_act="gelu_pytorch_tanh", torch_dtype="float32")
    else:
        cfg.update(rope_parameters={"rope_theta": theta, "rope_type": "default"}, dtype="float32",
                   layer_types=["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(L)])
    s = parse_config(json.dumps(cfg))
    # Scales: (1+w) of the pre-norms has rms ~1.04; logits std ~ 0.5 * final cap, scores std ~ 0.25 * attn cap;
    # post-norm gains put the branches at about half the embedding's scale so the layers matter.
    g = math.sqrt(1.0 + 1.0 / 12.0)
    sig_e = 0.5 * final_cap / (math.sqrt(D) * g)
    sig_qk = math.sqrt(0.25 * attn_cap * math.sqrt(qpas) / (D * math.sqrt(hd) * g * g))
    post_gain = 0.5 * sig_e * math.sqrt(D)
    sig = {"q_proj": sig_qk, "k_proj": sig_qk, "v_proj": D ** -0.5, "o_proj": (H * hd) ** -0.5,
           "gate_proj": D ** -0.5, "up_proj": D ** -0.5, "down_proj": I ** -0.5}
    weights = {"model.embed_tokens.weight": rng.standard_normal((V, D)) * sig_e,
               "model.norm.weight": rng.uniform(-0.5, 0.5, D)}
    for l in range(L):
        for p in PROJ:
            weights[f"model.layers.{l}.{'self_attn' if p in ATTN_PROJ else 'mlp'}.{p}.weight"] = \
                rng.standard_normal(proj_shape(s, p)) * sig[p]
        for n in NORMS:
            u = rng.uniform(-0.5, 0.5, D)
            weights[f"model.layers.{l}.{n}.weight"] = post_gain * (1.0 + u) - 1.0 if n.startswith("post") else u
    adapter, lora_txt = None, "no lora"
    if use_lora:
        targets = [p for p in PROJ if p in set(rng.choice(PROJ, size=int(rng.integers(1, 8)), replace=False))]
        r = int(rng.integers(1, 5))
        alpha = int(rng.choice([r, 2 * r, 16]))
        rslora = (i // 4) % 2 == 0
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        prefix = "base_model.model." if i % 3 == 0 else ""
        adapter = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
                   "target_modules": targets, "use_rslora": rslora, "bias": "none"}
        for l in range(L):
            for p in targets:
                mod = f"model.layers.{l}.{'self_attn' if p in ATTN_PROJ else 'mlp'}.{p}"
                out_f, in_f = proj_shape(s, p)
                weights[f"{prefix}{mod}.lora_A.weight"] = rng.standard_normal((r, in_f)) * in_f ** -0.5
                weights[f"{prefix}{mod}.lora_B.weight"] = rng.standard_normal((out_f, r)) * (
                    0.5 * sig[p] * math.sqrt(in_f) / (math.sqrt(r) * scaling))
        lora_txt = f"lora {'+'.join(targets)} r={r} alpha={alpha}{' rslora' if rslora else ''}{' prefixed' if prefix else ''}"
    # Token 0 is pad_token_id: HF's nn.Embedding(padding_idx=0) would drop its lookup gradient, which the spec
    # does not model, so the generated inputs avoid it.
    ids = rng.integers(1, V, size=(B, T)).astype(np.int64)
    labels = ids.copy()
    if i % 4 != 1:
        labels[rng.random((B, T)) < 0.25] = -100
    if not np.any(labels[:, 1:] != -100):
        labels[0, 1] = ids[0, 1]
    features = (f"V={V} D={D} I={I} L={L} H={H} KV={KV} (x{groups}) hd={hd} qpas={qpas} W={W} T={T} B={B} "
                f"{'old' if old_style else 'new'}-style caps={attn_cap:g}/{final_cap:g} theta={theta:g} "
                f"ignored={int(np.sum(labels[:, 1:] == -100))} {lora_txt}")
    return cfg, adapter, {n: a.astype(np.float32) for n, a in weights.items()}, ids, labels, features


def write_case(path, cfg, adapter, weights, ids, labels):
    tmp = _atomic_target(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["config_json"] = json.dumps(cfg, indent=2)
            if adapter is not None:
                f.attrs["adapter_config_json"] = json.dumps(adapter, indent=2)
            for name, arr in sorted(weights.items()):
                f.create_dataset(f"weights/{name}", data=arr)
            f.create_dataset("input_ids", data=ids)
            f.create_dataset("labels", data=labels)
        _finish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def make_cases(outdir, count, seed, shipped, command):
    if count < 1:
        raise CaseError("--count must be at least 1")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise CaseError(f"{outdir} exists and is not a directory")
    os.makedirs(outdir, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        cfg, adapter, weights, ids, labels, features = generate_case(i, rng)
        path = os.path.join(outdir, f"case_{i:03d}.h5")
        write_case(path, cfg, adapter, weights, ids, labels)
        results = fill_case(path, path, shipped, COMBOS, command)
        log(f"case_{i:03d}.h5: {features} | loss " + " ".join(f"{c}={results[c]['loss']:.12g}" for c in COMBOS))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fp = sub.add_parser("fill", help="compute /expected for one case file")
    fp.add_argument("case")
    fp.add_argument("--out", help="write here (the input is copied) instead of in place")
    fp.add_argument("--shipped", action="store_true", help="run HF as released (float32 islands kept)")
    fp.add_argument("--combos", default=",".join(COMBOS), help="comma list of none,attn,logits,attn_logits")
    mp = sub.add_parser("make-cases", help="generate random small cases and fill them")
    mp.add_argument("outdir")
    mp.add_argument("--count", type=int, required=True)
    mp.add_argument("--seed", type=int, required=True)
    mp.add_argument("--shipped", action="store_true")
    args = ap.parse_args(argv)
    command = shlex.join(sys.argv if argv is None else [sys.argv[0]] + list(argv))
    try:
        if args.cmd == "fill":
            combos = [c.strip() for c in args.combos.split(",") if c.strip()]
            bad = [c for c in combos if c not in COMBOS]
            if bad or not combos or len(set(combos)) != len(combos):
                raise CaseError(f"--combos {args.combos!r}: use distinct names from {','.join(COMBOS)}")
            fill_case(args.case, args.out or args.case, args.shipped, combos, command)
        else:
            make_cases(args.outdir, args.count, args.seed, args.shipped, command)
    except CaseError as e:
        print(f"hf_crosscheck: error: {e}", file=sys.stderr, flush=True)
        return 2
    except CheckFailed as e:
        print(f"hf_crosscheck: self-check failed: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
