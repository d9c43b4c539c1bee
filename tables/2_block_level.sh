#!/usr/bin/env bash
# The paper's tables/2_block_level.sh: runs `mtlora repro table4` (both setups: Flan-v2 -> BBH and Dolly-15k -> MMLU).
# Extra arguments are passed through, e.g. --dry-run, --smoke, --num_gpus 2, --model_name_or_path DIR.
set -euo pipefail
exec mtlora repro table4 "$@"
