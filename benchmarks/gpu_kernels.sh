#!/usr/bin/env bash
# The kernels step of benchmarks/gpu_check.sh (run there under `timeout`): the 1b preset (batch
# 8, where the plain run fits) with each GPU kernel option that can run here, beside the plain
# sdpa run: tokens/s and peak memory before and after, in $OUT/throughput_kernels.json; then
# `hanlm sft train.liger=true|false` on a tiny random Qwen2 (first losses, in the log).
# Needs PY (the python to use), OUT and PRESET_TIMEOUT in the environment.
set -u
variants=()
tmp=/tmp/hanlm-kernels
rc=0
rm -rf "$tmp" && mkdir -p "$tmp"
"$PY" -c "import liger_kernel" 2>/dev/null && variants+=(liger)
"$PY" -c "import flash_attn" 2>/dev/null && variants+=(fa2)
if ((${#variants[@]} == 0)); then
    echo "kernels: neither liger-kernel nor flash-attn is installed here (carry a liger-kernel"
    echo "wheel in .whl/: pip download --no-deps liger-kernel -d .whl); skipped"
    exit 0
fi
common=(--presets 1b --block-size 1024 --batch-size 8 --warmup 3 --steps 10
    --timeout "$PRESET_TIMEOUT")
"$PY" benchmarks/pretrain_throughput.py "${common[@]}" --out "$tmp/plain.json" || rc=1
for v in "${variants[@]}"; do
    extra=(--liger)
    [[ $v == fa2 ]] && extra=(--attn flash_attention_2)
    "$PY" benchmarks/pretrain_throughput.py "${common[@]}" "${extra[@]}" \
        --out "$tmp/$v.json" || rc=1
done
"$PY" - "$tmp" "$OUT/throughput_kernels.json" <<'PYEOF' || rc=1
import json, sys
from pathlib import Path

tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))}
rows = {name: (r.get("results") or [{}])[0] for name, r in runs.items()}
base = rows.get("plain", {})
print(f"{'variant':<8} {'tokens/s':>10} {'peak GiB':>9} {'speed':>6} {'memory':>7} first loss")
for name, row in rows.items():
tps, mem = row.get("tokens_per_s"), row.get("peak_gpu_mem_gib")
speed = tps / base["tokens_per_s"] if tps and base.get("tokens_per_s") else None
memr = mem / base["peak_gpu_mem_gib"] if mem and base.get("peak_gpu_mem_gib") else None
row["vs_plain"] = {"speed": speed, "memory": memr}
cells = [tps, mem, speed, memr]
text = [format(x, f) if isinstance(x, float) else str(x) for x, f in zip(cells, ("10.0f", "9.2f", "6.2f", "7.2f"))]
print(f"{name:<8} {text[0]:>10} {text[1]:>9} {text[2]:>6} {text[3]:>7} {row.get('first_loss')}")
out.write_text(json.dumps({"runs": runs, "rows": rows}, indent=2) + "\n")
PYEOF
if [[ " ${variants[*]} " == *" liger "* ]]; then  # the option end to end through hanlm sft
    rm -rf /tmp/hanlm-qwen2
    "$PY" -c "from hanlm.testing import tiny_qwen_dir; tiny_qwen_dir('/tmp/hanlm-qwen2')" || rc=1
    for liger in false true; do
        rm -rf "/tmp/hanlm-sft-liger-$liger"
        "$PY" -m hanlm sft model.path=/tmp/hanlm-qwen2 train.max_steps=5 train.logging_steps=1 \
            train.eval_steps=0 train.liger=$liger output_dir="/tmp/hanlm-sft-liger-$liger" || rc=1
        grep -m1 '"loss"' "/tmp/hanlm-sft-liger-$liger/metrics.jsonl" || rc=1
    done
fi
exit $rc
