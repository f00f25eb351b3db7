#!/usr/bin/env bash
# Build the official packages' environments for `make parity`, outside the product's .venv.
#
# Each official package needs torchvision and an older transformers than ours, so each group gets its own
# venv under .parity/ (gitignored). A venv is rebuilt only when its requirement line changes (stamp file).
# CPU recipe: torch 2.14.1 + torchvision 0.29.1 (their CPU wheels install together here).
set -euo pipefail
set -f  # requirement specifiers like "transformers==4.57.*" are never globs
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROOT=${PARITY_DIR:-.parity}
TORCH="torch==2.14.1 torchvision==0.29.1"

# name -> requirements (besides torch). Versions are the ones the fidelity claims were checked against.
# image-reward imports OpenAI's `clip` (openai-clip needs pkg_resources) and diffusers (one that still
# works with transformers 4.46).
declare -A ENVS=(
  [hf457]='transformers==4.57.* torchmetrics==1.9.* open_clip_torch==3.3.* hpsv2==1.2.0 ftfy safetensors pillow'
  [ir146]='transformers==4.46.* timm==0.6.13 image-reward==1.5 openai-clip setuptools<81 diffusers==0.31.* fairscale safetensors pillow'
)

post_install() {
  # hpsv2 1.2.0's wheel lacks the BPE vocabulary its bundled open_clip tokenizer opens at import; it is the
  # same file open_clip ships (sha256 924691ac...).
  if [[ $1 == hf457 ]]; then
    local site
    site=$("$2/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp "$site/open_clip/bpe_simple_vocab_16e6.txt.gz" "$site/hpsv2/src/open_clip/"
  fi
}

build() {
  local name=$1 reqs=$2 dir="$ROOT/$1"
  local want="$TORCH $reqs"
  if [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$want" ]]; then
    echo "[$name] up to date"; return
  fi
  echo "[$name] building: $want"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  "$dir/bin/python" -m pip install -q $TORCH
  # shellcheck disable=SC2086
  "$dir/bin/python" -m pip install -q $TORCH $reqs  # reqs is a word list on purpose
  post_install "$name" "$dir"
  echo "$want" > "$dir/.stamp"
  "$dir/bin/python" -m pip freeze > "$dir/freeze.txt"
  echo "[$name] done"
}

for name in "${!ENVS[@]}"; do
  if [[ $# -eq 0 || " $* " == *" $name "* ]]; then build "$name" "${ENVS[$name]}"; fi
done
