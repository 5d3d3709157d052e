"""Case files (HDF5, docs/formats.md) as the Python tools read and write them: tools/hf_crosscheck.py and
tools/torch_case.py share this reader, so that both refuse the same inputs the same way (CaseError: exit 2 with
one line), and this writer, which copies a case and replaces its /expected atomically.

Needs h5py and numpy; building an HF config (build_hf_config) needs transformers, imported when called.
"""

import argparse
import copy
import json
import math
import os
import re
import tempfile

import h5py
import numpy as np


COMBOS = ("none", "attn", "logits", "attn_logits")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
PROJ = ATTN_PROJ + MLP_PROJ
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
LORA_RE = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight$")


class CaseError(Exception):
    """Bad or unsupported input: exit 2 with one line."""


class CheckFailed(Exception):
    """HF and the independent implementation disagree: exit 1."""



def _attr_text(attrs, key, required=True):
    if key not in attrs:
        if required:
            raise CaseError(f"root attribute '{key}' is missing")
        return None
    v = attrs[key]
    if isinstance(v, np.ndarray):
        if v.size != 1:
            raise CaseError(f"root attribute '{key}' is an array, expected one string")
        v = v.reshape(-1)[0]
    if isinstance(v, (bytes, np.bytes_)):
        v = bytes(v).decode("utf-8")
    if not isinstance(v, str):
        raise CaseError(f"root attribute '{key}' is not a string")
    return v


def _int(raw, key, default=None, minimum=1):
    v = raw.get(key, default)
    if v is None:
        raise CaseError(f"config_json lacks '{key}'")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or int(v) < minimum:
        raise CaseError(f"config_json '{key}' = {v!r} is not an integer >= {minimum}")
    return int(v)


def _cap(raw, key, default):
    v = raw.get(key, default)  # HF's defaults: absent -> 50 / 30, null -> off
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise CaseError(f"config_json '{key}' = {v!r} is not a positive number or null")
    return float(v)


def parse_config(text):
    """The spec's reading of config.json (old or new key style), independent of HF's."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise CaseError(f"config_json is not valid JSON: {e}")
    if not isinstance(raw, dict):
        raise CaseError("config_json is not a JSON object")
    if raw.get("model_type", "gemma2") != "gemma2":
        raise CaseError(f"config_json model_type is {raw.get('model_type')!r}, expected 'gemma2'")
    s = argparse.Namespace(raw=raw)
    s.V, s.D, s.I = _int(raw, "vocab_size"), _int(raw, "hidden_size"), _int(raw, "intermediate_size")
    s.L, s.H, s.KV = _int(raw, "num_hidden_layers"), _int(raw, "num_attention_heads"), _int(raw, "num_key_value_heads")
    s.hd = _int(raw, "head_dim")
    s.qpas = _int(raw, "query_pre_attn_scalar", 256)
    s.W = _int(raw, "sliding_window", 4096)
    if s.H % s.KV or s.hd % 2:
        raise CaseError(f"num_attention_heads {s.H} not a multiple of num_key_value_heads {s.KV}, or odd head_dim {s.hd}")
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise CaseError(f"config_json rms_norm_eps = {eps!r} is not a positive number")
    s.eps = float(eps)
    s.attn_cap = _cap(raw, "attn_logit_softcapping", 50.0)
    s.final_cap = _cap(raw, "final_logit_softcapping", 30.0)
    rp = raw.get("rope_parameters")
    if raw.get("rope_scaling") is not None:
        raise CaseError("config_json rope_scaling is not supported (default RoPE only)")
    if rp is not None:
        if not isinstance(rp, dict) or rp.get("rope_type", rp.get("type", "default")) != "default":
            raise CaseError(f"config_json rope_parameters {rp!r}: only rope_type 'default' is supported")
        theta = rp.get("rope_theta", raw.get("rope_theta", 10000.0))
        if "rope_theta" in raw and raw["rope_theta"] != theta:
            raise CaseError("config_json has different rope_theta top level and in rope_parameters")
    else:
        theta = raw.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1:
        raise CaseError(f"config_json rope_theta = {theta!r} is not a number > 1")
    s.theta = float(theta)
    lt = raw.get("layer_types")
    if lt is None:  # old style: layer i slides when i is even
        lt = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s.L)]
    if not isinstance(lt, list) or len(lt) != s.L or any(t not in ("sliding_attention", "full_attention") for t in lt):
        raise CaseError(f"config_json layer_types {lt!r} is not a list of {s.L} 'sliding_attention'/'full_attention'")
    s.layer_types = list(lt)
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise CaseError(f"config_json activation {act!r} is not supported (gelu_pytorch_tanh only)")
    if raw.get("tie_word_embeddings", True) is not True:
        raise CaseError("config_json tie_word_embeddings must be true")
    if raw.get("attention_bias", False) or raw.get("use_bidirectional_attention"):
        raise CaseError("config_json attention_bias / use_bidirectional_attention are not supported")
    pad = raw.get("pad_token_id", 0)
    s.pad = pad if isinstance(pad, int) and not isinstance(pad, bool) else None
    return s


def parse_adapter(text):
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise CaseError(f"adapter_config_json is not valid JSON: {e}")
    if not isinstance(raw, dict):
        raise CaseError("adapter_config_json is not a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise CaseError(f"adapter_config_json peft_type {raw.get('peft_type')!r} is not LORA")
    bad = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                       "layers_to_transform", "layers_pattern") if raw.get(k)]
    if raw.get("bias", "none") not in (None, "none"):
        bad.append("bias")
    if bad:
        raise CaseError(f"adapter_config_json uses unsupported settings: {', '.join(bad)}")
    r, alpha, tm = raw.get("r"), raw.get("lora_alpha"), raw.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CaseError(f"adapter_config_json r = {r!r} is not a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise CaseError(f"adapter_config_json lora_alpha = {alpha!r} is not a positive number")
    if not (isinstance(tm, str) or (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm))):
        raise CaseError(f"adapter_config_json target_modules = {tm!r} is not a string or list of strings")
    if raw.get("lora_dropout"):
        print(f"  note: adapter lora_dropout = {raw['lora_dropout']} ignored: expected values are dropout-free", flush=True)
    rs = bool(raw.get("use_rslora", False))
    return argparse.Namespace(r=r, alpha=alpha, target_modules=tm, use_rslora=rs,
                              scaling=alpha / math.sqrt(r) if rs else alpha / r)


def proj_shape(s, proj):
    """[out, in] of a projection, HF layout."""
    return {"q_proj": (s.H * s.hd, s.D), "k_proj": (s.KV * s.hd, s.D), "v_proj": (s.KV * s.hd, s.D),
            "o_proj": (s.D, s.H * s.hd), "gate_proj": (s.I, s.D), "up_proj": (s.I, s.D),
            "down_proj": (s.D, s.I)}[proj]


def base_shapes(s):
    shapes = {"model.embed_tokens.weight": (s.V, s.D), "model.norm.weight": (s.D,)}
    for l in range(s.L):
        for p in PROJ:
            shapes[f"model.layers.{l}.{'self_attn' if p in ATTN_PROJ else 'mlp'}.{p}.weight"] = proj_shape(s, p)
        for n in NORMS:
            shapes[f"model.layers.{l}.{n}.weight"] = (s.D,)
    return shapes


def read_case(path):
    if not os.path.isfile(path):
        raise CaseError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CaseError(f"{path}: not a readable HDF5 file ({e})")
    with f:
        spec = parse_config(_attr_text(f.attrs, "config_json"))
        atext = _attr_text(f.attrs, "adapter_config_json", required=False)
        adapter = parse_adapter(atext) if atext is not None else None
        if not isinstance(f.get("weights"), h5py.Group):
            raise CaseError("/weights group is missing")
        tensors = {}
        for name, obj in f["weights"].items():
            if not isinstance(obj, h5py.Dataset):
                raise CaseError(f"/weights/{name} is not a dataset")
            if obj.dtype.kind != "f" or obj.dtype.itemsize not in (2, 4, 8):
                raise CaseError(f"/weights/{name} has dtype {obj.dtype}, expected float16/32/64")
            arr = np.asarray(obj[()], dtype=np.float64)
            if not np.all(np.isfinite(arr)):
                raise CaseError(f"/weights/{name} has non-finite values")
            tensors[name] = arr
        ids_labels = []
        for key in ("input_ids", "labels", "position_ids", "attention_mask"):
            obj = f.get(key)
            if obj is None and key in ("position_ids", "attention_mask"):
                ids_labels.append(None)
                continue
            if not isinstance(obj, h5py.Dataset) or obj.dtype.kind not in "iu" or obj.ndim != 2:
                raise CaseError(f"/{key} is missing or not a 2-D integer dataset")
            ids_labels.append(np.asarray(obj[()], dtype=np.int64))
    ids, labels, position_ids, attention_mask = ids_labels
    s = spec
    base, lora = {}, {}
    for name, arr in tensors.items():
        m = LORA_RE.match(name)
        if m:
            mod, proj, ab = m.groups()
            if proj not in PROJ or (".self_attn." in mod) != (proj in ATTN_PROJ) or int(mod.split(".")[2]) >= s.L:
                raise CaseError(f"/weights/{name}: not an adapter on a projection of this model")
            if ab in lora.setdefault(mod, {}):
                raise CaseError(f"/weights/{name}: adapter tensor given twice (with and without prefix)")
            lora[mod][ab] = arr
        elif "lora_" in name:
            raise CaseError(f"/weights/{name}: unrecognised adapter tensor name")
        else:
            base[name] = arr
    shapes = base_shapes(s)
    for name in sorted(shapes):
        if name not in base:
            raise CaseError(f"/weights/{name} is missing")
        if base[name].shape != shapes[name]:
            raise CaseError(f"/weights/{name} has shape {base[name].shape}, expected {shapes[name]}")
    for name in sorted(base):
        if name not in shapes and name != "lm_head.weight":
            raise CaseError(f"/weights/{name} is not a weight of this model")
    if "lm_head.weight" in base:
        if not np.array_equal(base.pop("lm_head.weight"), base["model.embed_tokens.weight"]):
            raise CaseError("/weights/lm_head.weight differs from model.embed_tokens.weight (the model is tied)")
    if lora and adapter is None:
        raise CaseError("adapter tensors present but no adapter_config_json")
    if adapter is not None and not lora:
        raise CaseError("adapter_config_json present but no lora_A/lora_B tensors")
    for mod, ab in sorted(lora.items()):
        if set(ab) != {"A", "B"}:
            raise CaseError(f"{mod}: needs both lora_A and lora_B")
        out_f, in_f = proj_shape(s, mod.rsplit(".", 1)[1])
        if ab["A"].shape != (adapter.r, in_f) or ab["B"].shape != (out_f, adapter.r):
            raise CaseError(f"{mod}: lora_A {ab['A'].shape} / lora_B {ab['B'].shape}, expected "
                            f"{(adapter.r, in_f)} / {(out_f, adapter.r)}")
    if ids.shape != labels.shape or ids.shape[1] < 2:
        raise CaseError(f"/input_ids {ids.shape} and /labels {labels.shape} must both be [B, T] with T >= 2")
    if ids.min() < 0 or ids.max() >= s.V:
        raise CaseError(f"/input_ids has ids outside [0, {s.V})")
    if np.any((labels != -100) & ((labels < 0) | (labels >= s.V))):
        raise CaseError(f"/labels has values outside [0, {s.V}) other than -100")
    if not np.any(labels[:, 1:] != -100):
        raise CaseError("/labels scores no target (every labels[:, 1:] is -100)")
    for key, arr in (("position_ids", position_ids), ("attention_mask", attention_mask)):
        if arr is not None and arr.shape != ids.shape:
            raise CaseError(f"/{key} {arr.shape} does not match /input_ids {ids.shape}")
    if position_ids is not None and position_ids.min() < 0:
        raise CaseError("/position_ids has negative positions")
    if attention_mask is not None:
        if np.any((attention_mask != 0) & (attention_mask != 1)):
            raise CaseError("/attention_mask has values other than 0 and 1")
        if np.any((attention_mask == 0) & (labels != -100)) or np.any((attention_mask[:, :-1] == 0) & (labels[:, 1:] != -100)):
            raise CaseError("/labels scores a padding position (or the target of one)")
    return argparse.Namespace(spec=s, adapter=adapter, base=base, lora=lora, ids=ids, labels=labels,
                              position_ids=position_ids, attention_mask=attention_mask)



def combo_caps(s, combo):
    attn, final = combo in ("attn", "attn_logits"), combo in ("logits", "attn_logits")
    if (attn and s.attn_cap is None) or (final and s.final_cap is None):
        raise CaseError(f"combo '{combo}' needs a cap that config_json sets to null; choose --combos")
    return (s.attn_cap if attn else None), (s.final_cap if final else None)



def build_hf_config(s, attn_cap, final_cap, attn_implementation="eager"):
    from transformers import Gemma2Config
    d = copy.deepcopy(s.raw)
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "max_position_embeddings"):
        if isinstance(d.get(k), float):  # HF 5 configs are strictly typed dataclasses
            d[k] = int(d[k])
    for k in ("rms_norm_eps", "initializer_range", "attention_dropout", "rope_theta"):
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool):
            d[k] = float(d[k])
    if isinstance(d.get("rope_parameters"), dict) and isinstance(d["rope_parameters"].get("rope_theta"), int):
        d["rope_parameters"]["rope_theta"] = float(d["rope_parameters"]["rope_theta"])
    d.update(attn_logit_softcapping=attn_cap, final_logit_softcapping=final_cap, use_cache=False, attention_dropout=0.0)
    try:
        cfg = Gemma2Config.from_dict(d)
    except Exception as e:
        raise CaseError(f"transformers rejected config_json: {type(e).__name__}: {e}")
    cfg._attn_implementation = attn_implementation
    rp = getattr(cfg, "rope_parameters", None)
    seen = {"layer_types": list(getattr(cfg, "layer_types", None) or []),
            "rope_theta": rp.get("rope_theta") if isinstance(rp, dict) else None,
            "rope_type": rp.get("rope_type") if isinstance(rp, dict) else None,
            "sliding_window": cfg.sliding_window, "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
            "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
            "attn_logit_softcapping": cfg.attn_logit_softcapping, "final_logit_softcapping": cfg.final_logit_softcapping}
    want = {"layer_types": s.layer_types, "rope_theta": s.theta, "rope_type": "default", "sliding_window": s.W,
            "query_pre_attn_scalar": s.qpas, "head_dim": s.hd, "rms_norm_eps": s.eps,
            "attn_logit_softcapping": attn_cap, "final_logit_softcapping": final_cap}
    diff = [f"{k}: HF {seen[k]!r} vs spec {want[k]!r}" for k in want if seen[k] != want[k]]
    if diff:
        raise CheckFailed("transformers reads config_json differently from the spec: " + "; ".join(diff))
    return cfg



def _atomic_target(out_path):
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out_path) + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    return tmp


def _finish(tmp, out_path):
    mode = os.stat(out_path).st_mode & 0o777 if os.path.exists(out_path) else 0o644
    os.chmod(tmp, mode)
    os.replace(tmp, out_path)


def write_expected(src_path, out_path, results, attrs):
    # A fresh file (not an edit in place): HDF5 never reclaims a deleted /expected, refills would grow the file.
    tmp = _atomic_target(out_path)
    try:
        with h5py.File(src_path, "r") as src, h5py.File(tmp, "w") as dst:
            for k in src.attrs:
                aid = src.attrs.get_id(k)
                dst.attrs.create(k, src.attrs[k], shape=aid.shape, dtype=aid.dtype)
            for k in src:
                if k != "expected":
                    src.copy(src[k], dst, name=k)
            g = dst.create_group("expected")
            for k, v in attrs.items():
                g.attrs[k] = str(v)
            for combo, r in results.items():
                cg = g.create_group(combo)
                for k, v in r.get("attrs", {}).items():
                    cg.attrs[k] = str(v)
                cg.create_dataset("loss", data=np.float64(r["loss"]))
                cg.create_dataset("logits", data=np.asarray(r["logits"], dtype=np.float64))
                gg = cg.create_group("grads")
                for name, arr in sorted(r["grads"].items()):
                    gg.create_dataset(name, data=np.asarray(arr, dtype=np.float64))
        _finish(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
