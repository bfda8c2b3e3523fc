#!/bin/sh
# The peers' virtual environments for `make bench`, never tether's dependencies:
#   benchmarks/.venv-trl    TRL's current release (SFT, reward model, DPO, KTO, GRPO)
#   benchmarks/.venv-trl19  TRL 1.9.x, the last release with PPO (trl.experimental.ppo)
# torch is installed first, at exactly the version tether's venv holds (2.13.0+cpu here, from this
# machine's package index, as the Makefile installs it), so no peer pulls a CUDA build; transformers,
# accelerate, datasets, tokenizers and safetensors are pinned to tether's versions too, so the two
# sides differ by the toolkit alone. Idempotent: a stamp file records what each venv holds.
# Usage: sh benchmarks/setup_peers.sh [TETHER_PYTHON]   (default .venv/bin/python)
set -eu
TETHER_PY=${1:-.venv/bin/python}
PYTHON=${PYTHON:-python3}
DIR=$(dirname "$0")
PINS=$("$TETHER_PY" -c "
from importlib.metadata import version
print(' '.join(f'{p}=={version(p)}' for p in ('torch', 'transformers', 'accelerate', 'datasets', 'tokenizers', 'safetensors')))")
TORCH=${PINS%% *}

for pair in ".venv-trl trl==1.16.0" ".venv-trl19 trl==1.9.2"; do
  set -- $pair
  venv=$DIR/$1 trl=$2
  want="$trl $PINS"
  if [ -f "$venv/.bench-stamp" ] && [ "$(cat "$venv/.bench-stamp")" = "$want" ]; then continue; fi
  echo "setting up $venv: $want"
  test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$TORCH"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q "$trl" $PINS
  "$venv/bin/python" -c "import torch, trl; print('  torch', torch.__version__, 'cuda available:', torch.cuda.is_available(), '/ trl', trl.__version__)"
  test "$("$venv/bin/python" -c 'import torch; print(torch.__version__)')" = "${TORCH#torch==}" || { echo "$venv: torch is not ${TORCH#torch==}" >&2; exit 1; }
  echo "$want" > "$venv/.bench-stamp"
done
