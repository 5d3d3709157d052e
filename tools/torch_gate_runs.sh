#!/usr/bin/env bash
# The PyTorch gate on the GPU host: five PyTorch Gemma 2 implementations on one case at gemma2-2b's widths, each
# judged by `verify --case` (docs/torch.md). What each must do:
#   hf-eager          transformers Gemma2ForCausalLM, eager attention, bf16          pass
#   hf-sdpa           the same with sdpa, which drops the attention softcap         fail: attention gradients named,
#                                                                                   no-attn-softcap on top
#   hf-flex           the same with flex_attention (the cap as a score_mod)         pass
#   no-final-softcap  eager with config.final_logit_softcapping = None              fail: no-logit-softcap on top
#   hf-eager-compiled the eager model under torch.compile                           pass
# Prints one line per run (verdict, worst value / tolerance and where, top fingerprint) and writes them to
# $OUT/torch_gate.json when OUT is set. Exit 0 when every run came out as it must, 1 otherwise, 2 on bad setup.
#
#   VERIFY=.gpu/bin/verify MAKE_CASE=.gpu/bin/make-case LD_LIBRARY_PATH=.gpu/lib tools/torch_gate_runs.sh
#
# Environment: VERIFY, MAKE_CASE (the project's binaries; default build/tools/...), PYTHON (python3), DEVICE
# (cuda), MODEL (gemma2-2b), SEQ (16: sequences twice the window of 8, so that the sliding layer masks), WORK (a
# temporary directory). The reference runs on the host's CPU and its cost is the 256000-row head: on the 2-core
# CPU machine, verify of one passing result at 2 x 32 tokens took 443 s (float64 61 s, the hf-bf16 policy and its
# three variants 382 s), a failing one adds a float64 step per known bug; 2 x 16 halves that, and 16 cores divide it.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
VERIFY=${VERIFY:-$root/build/tools/verify}
MAKE_CASE=${MAKE_CASE:-$root/build/tools/make-case}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SEQ=${SEQ:-16}
MODEL=${MODEL:-gemma2-2b}
for b in "$VERIFY" "$MAKE_CASE"; do
  [ -x "$b" ] || { echo "torch_gate_runs: $b is not an executable (set VERIFY and MAKE_CASE)" >&2; exit 2; }
done
"$PYTHON" -c "import torch, transformers, h5py" 2>/dev/null \
  || { echo "torch_gate_runs: $PYTHON lacks torch, transformers or h5py" >&2; exit 2; }
work=${WORK:-$(mktemp -d)}
mkdir -p "$work"
t0=$SECONDS

case_file=$work/case.h5
"$MAKE_CASE" --model "$MODEL" --layers 2 --batch 2 --seq "$SEQ" --window $((SEQ / 2)) --lora-r 8 --out "$case_file" >/dev/null \
  || { echo "torch_gate_runs: make-case failed" >&2; exit 2; }

# name | torch_case.py arguments | what it must do (pass, or fail:<top fingerprint>)
runs=(
  "hf-eager|--attn-implementation eager|pass"
  "hf-sdpa|--attn-implementation sdpa|fail:no-attn-softcap"
  "hf-flex|--attn-implementation flex_attention|pass"
  "no-final-softcap|--factory $root/tests/torch_factories.py:no_final_softcap|fail:no-logit-softcap"
  "hf-eager-compiled|--attn-implementation eager --compile|pass"
)
lines=()
all_ok=1
for r in "${runs[@]}"; do
  IFS='|' read -r name args want <<<"$r"
  s=$SECONDS
  # shellcheck disable=SC2086
  if ! "$PYTHON" "$root/tools/torch_case.py" "$case_file" --out "$work/$name.h5" --device "$DEVICE" $args \
       >"$work/$name.torch.log" 2>&1; then
    echo "$name: torch_case.py failed: $(tail -1 "$work/$name.torch.log")"
    lines+=("{\"run\": \"$name\", \"want\": \"$want\", \"verdict\": \"error\", \"ok\": false}")
    all_ok=0
    continue
  fi
  "$VERIFY" --case "$work/$name.h5" --json "$work/$name.json" >"$work/$name.verify.log" 2>&1
  rc=$?
  line=$("$PYTHON" - "$work/$name.json" "$name" "$want" "$rc" "$((SECONDS - s))" <<'EOF'
import json, sys
path, name, want, rc, secs = sys.argv[1:]
try:
    j = json.load(open(path))
except (OSError, ValueError):
    print(json.dumps({"run": name, "want": want, "verdict": f"verify exit {rc}, no JSON", "ok": False}))
    sys.exit()
torch_checks = [c for c in j["checks"] if "torch vs" in c["name"]]
worst = max(torch_checks, key=lambda c: (c["value"] or float("inf")) / c["tolerance"]) if torch_checks else None
failed = list(dict.fromkeys(c["name"].split(": ", 1)[1] for c in torch_checks if not c["pass"]))
t = j["results"]["torch"]
verdict = "pass" if rc == "0" else "fail" if rc == "1" else f"exit {rc}"
top = t.get("top_fingerprint")
ok = verdict == want if want == "pass" else (verdict == "fail" and top == want.split(":", 1)[1])
print(json.dumps({"run": name, "want": want, "verdict": verdict, "ok": ok, "seconds": int(secs),
                  "worst_ratio": (worst["value"] or float("inf")) / worst["tolerance"] if worst else None,
                  "worst_check": worst["name"] if worst else None, "top_fingerprint": top,
                  "fingerprints": t.get("fingerprints", [])[:3], "failed_checks": failed}))
EOF
)
  lines+=("$line")
  "$PYTHON" - "$line" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
w = f"worst {r['worst_ratio']:.3g} x tol ({r['worst_check']})" if r.get("worst_ratio") is not None else ""
fp = f"; top fingerprint {r['top_fingerprint']}" if r.get("top_fingerprint") else ""
failed = r.get("failed_checks") or []
named = f"; failed: {', '.join(failed[:6])}{' ...' if len(failed) > 6 else ''}" if failed else ""
print(f"{r['run']:18s} {r['verdict']:5s} (want {r['want']}) {'OK' if r['ok'] else 'WRONG'}: {w}{fp}{named}; {r.get('seconds', '?')} s")
EOF
  grep -q '"ok": true' <<<"$line" || all_ok=0
done
echo "total $((SECONDS - t0)) s; logs and results in $work"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  { echo "["; (IFS=$',\n'; echo "${lines[*]}"); echo "]"; } >"$OUT/torch_gate.json"
fi
[ $all_ok = 1 ]
