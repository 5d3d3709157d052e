#!/usr/bin/env python3
"""An adapter saved by `train` loaded by HF transformers + PEFT, in float64, and its held-out loss.

Run on the GPU host, where transformers 5.x, PEFT and torch are installed (the CPU is enough):

    python3 tools/peft_roundtrip.py --base BASE_DIR --adapter ADAPTER_DIR --data HELD_OUT.jsonl --seq-len T [--packing]

BASE_DIR holds config.json and model.safetensors (`train --save-base BASE_DIR` writes a preset's synthetic base);
ADAPTER_DIR is what `train --save-adapter` wrote. The model is loaded with Gemma2ForCausalLM.from_pretrained and
PeftModel.from_pretrained: the same code path a user's script takes, so a wrong tensor name, key or scaling in the
saved adapter shows here. HF's float32 islands (RMSNorm, RoPE, softmax, loss) are replaced by float64 versions of
the same formulas (tools/hf_crosscheck.py, install_patches), so the loss is comparable to the float64 reference to
~1e-15. The rows are built as train builds them (tokenized rows only: input_ids, optional labels; padded or packed
to --seq-len), and the printed loss is the mean over every scored target of every row. Compare it with

    build/tools/train --config BASE_DIR/config.json --weights BASE_DIR --adapter ADAPTER_DIR \\
        --eval-data HELD_OUT.jsonl --seq-len T --max-steps 0

whose `eval_loss` line is the float64 reference's value for the same rows. Exit 0 and the loss printed; with
--expect X, exit 1 when |loss - X| > --tolerance * |X| (default 1e-12).
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_crosscheck  # noqa: E402  (the float64 patches of HF's float32 islands)


def rows_from_jsonl(path, seq_len, packing, pad_id):
    """input_ids / labels / position_ids / attention_mask lists, as train/data.cpp builds them."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "input_ids" not in row:
                sys.exit(f"{path}:{n}: only tokenized rows (input_ids) are read here")
            ids = list(row["input_ids"])
            labels = list(row.get("labels") or ids)
            examples.append((ids[:seq_len], labels[:seq_len]))
    rows = []
    if not packing:
        for ids, labels in examples:
            pad = seq_len - len(ids)
            rows.append({"input_ids": ids + [pad_id] * pad, "labels": labels + [-100] * pad,
                         "attention_mask": [1] * len(ids) + [0] * pad})
        return rows
    cur = {"input_ids": [], "labels": [], "position_ids": []}

    def close():
        p = 0
        while len(cur["input_ids"]) < seq_len:  # the tail: one more document of pad tokens, never scored
            cur["input_ids"].append(pad_id)
            cur["labels"].append(-100)
            cur["position_ids"].append(p)
            p += 1
        rows.append(dict(cur))

    for ids, labels in examples:
        if len(cur["input_ids"]) + len(ids) > seq_len:
            close()
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ids
        cur["labels"] += [-100] + labels[1:]  # the first token of a document is no target of the previous one
        cur["position_ids"] += list(range(len(ids)))
    if cur["input_ids"]:
        close()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="directory with config.json and model.safetensors")
    ap.add_argument("--adapter", required=True, help="directory train --save-adapter wrote")
    ap.add_argument("--data", required=True, help="held-out JSONL (tokenized rows)")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--batch", type=int, default=4, help="rows per forward pass")
    ap.add_argument("--shipped", action="store_true", help="HF as shipped (float32 islands), not patched")
    ap.add_argument("--expect", type=float, help="the reference's eval_loss, to compare with")
    ap.add_argument("--tolerance", type=float, default=1e-12)
    a = ap.parse_args(argv)

    import peft
    from transformers import Gemma2ForCausalLM

    hf_crosscheck.install_patches(a.shipped)
    model = Gemma2ForCausalLM.from_pretrained(a.base, dtype=torch.float64, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(model, a.adapter)
    model.eval()
    cfg = json.load(open(os.path.join(a.adapter, "adapter_config.json")))
    n_lora = sum(1 for n, _ in model.named_parameters() if ".lora_A." in n)
    if not all(p.dtype == torch.float64 for p in model.parameters()):
        sys.exit("some parameters are not float64")
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rows = rows_from_jsonl(a.data, a.seq_len, a.packing, pad_id)
    loss_sum, targets = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), a.batch):
            chunk = rows[i:i + a.batch]
            ids = torch.tensor([r["input_ids"] for r in chunk])
            labels = torch.tensor([r["labels"] for r in chunk])
            extra = {}
            if a.packing:
                extra["position_ids"] = torch.tensor([r["position_ids"] for r in chunk])
            else:
                extra["attention_mask"] = torch.tensor([r["attention_mask"] for r in chunk])
            # use_cache=False, as in training: with a cache transformers does not separate packed documents.
            logits = model(input_ids=ids, use_cache=False, **extra).logits.to(torch.float64)
            shift = labels[:, 1:].reshape(-1)
            lp = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift,
                                                   ignore_index=-100, reduction="sum")
            loss_sum += float(lp)
            targets += int((shift != -100).sum())
    loss = loss_sum / targets
    print(f"peft: r={cfg.get('r')} lora_alpha={cfg.get('lora_alpha')} on {n_lora} modules; "
          f"{len(rows)} rows, {targets} scored targets")
    print(f"eval_loss {loss:.17g}")
    if a.expect is not None:
        rel = abs(loss - a.expect) / abs(a.expect)
        ok = rel <= a.tolerance
        print(f"vs reference {a.expect:.17g}: relative difference {rel:.3e} (tolerance {a.tolerance:g}) "
              f"{'OK' if ok else 'FAIL'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
