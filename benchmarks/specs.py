"""Named benchmark runs: name → script, arguments, time budget. `benchmarks/run.py` runs them.

``{out}`` in an argument is the spec's output folder. ``script`` is a path under the repository root, or ``"pytest"``
for ``python -m pytest``. ``budget_s`` is the spec's timeout; a script's own ``--max-minutes`` stays inside it (tested). ``env`` is added to the
environment (a value of None removes the variable).
A device call lasts at most 10 minutes: pick specs whose budgets fit together (``run.py --list`` shows them).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Spec:
    name: str
    script: str
    args: tuple[str, ...]
    budget_s: int
    about: str
    env: dict = field(default_factory=dict)
    gpu: bool = True

    def argv(self, out: str) -> list[str]:
        return [a.replace("{out}", out) for a in self.args]


QUALITY_EAGER = ("benchmarks/quality.py", "--exec", "eager", "--out", "{out}")
E2E = ("--out", "{out}")

SPECS: dict[str, Spec] = {s.name: s for s in (
    # attention kernel
    Spec("attention", "benchmarks/bench_attention.py", ("--rep", "60", "--out", "{out}"), 480,
         "attention kernel table: SDPA flash / cuDNN, SageAttention, FlexAttention with the same mask and ours (compact "
         "CSRs) on the CogVideoX-5B, Flux-1024 and long-32k shapes at densities 1 / 0.5 / 0.3 / 0.2"),
    Spec("attention-cogvideox", "benchmarks/bench_attention.py",
         ("--rep", "60", "--shapes", "cogvideox-5b", "--modes", "--out", "{out}"), 240,
         "the attention table's CogVideoX-5B rows only, with INT4 QKᵀ and INT8 / bf16 PV"),
    Spec("attention-long32k", "benchmarks/bench_attention.py", ("--rep", "60", "--shapes", "long-32k", "--out", "{out}"),
         240, "the attention table's long-32k rows only (B1·H24·N32768·D128)"),
    Spec("attention-flux", "benchmarks/bench_attention.py", ("--rep", "60", "--shapes", "flux-1024", "--out", "{out}"),
         180, "the attention table's Flux-1024 rows only (B1·H24·N4608·D128; host-bound at this size)"),
    Spec("pv-formats", "benchmarks/kernel_variants.py",
         ("--variants", "fp8,bf16,int8 ftz", "--densities", "1.0,0.3,0.2", "--out", "{out}/kernel_variants.json"), 300,
         "PV format speed against accuracy (FP8 / bf16 / INT8 PV), fixed launch configs, CogVideoX-5B shape"),
    Spec("lazy-rescale", "benchmarks/kernel_variants.py",
         ("--variants", "fp8,fp8 lazy-rescale,fp8 tma,fp8 tma lazy-rescale", "--densities", "1.0,0.2", "--shape",
          "1,40,75600,128", "--no-flex", "--out", "{out}/kernel_variants_lazy_rescale.json"), 420,
         "the accumulator rescale skipped where no row's max rose (lazy_rescale), Wan-720p shape, dense and 0.2"),
    Spec("mask-decode-720p", "benchmarks/bench_mask_decode.py", ("--out", "{out}"), 300,
         "bitmap-form masks: the walk decode alone and decode + kernel against the CSR-form kernel call, one "
         "Wan2.1-14B and one HunyuanVideo 720p site at densities 0.2 / 0.3", env={"PARO_AUTOTUNE": "0"}),
    Spec("compensation", "benchmarks/bench_compensation.py",
         ("--blocks", "64,32,16", "--masks", "coherent", "--out", "{out}"), 300,
         "skipped-block compensation: kernel time with and without it at blocks 64 / 32 / 16, FlexAttention with the "
         "same mask, cuDNN dense"),
    Spec("calibrate-site", "benchmarks/calibrate_cog_site.py", ("--out", "{out}"), 120,
         "time and peak memory of calibrating one CogVideoX-5B-sized attention site"),
    Spec("calibrate-720p", "benchmarks/calibrate_720p.py", ("--out", "{out}"), 240,
         "time and peak memory of one calibration call at a Wan2.1-720p and a HunyuanVideo-720p site, and the whole "
         "model's plan size at density 0.2 / 0.3 (targets: 10 s, 20 GiB per site per call)"),
    # end to end
    Spec("e2e-cog42", "benchmarks/bench_e2e.py",
         (*E2E, "--model", "cog", "--layers", "42", "--iters", "5", "--variants", "compile-cudnn,paro-0.2",
          "--max-minutes", "8.8"), 560,
         "CogVideoX-5B-shaped transformer, all 42 layers, B=2: torch.compile with cuDNN SDPA against paro at density 0.2"),
    Spec("e2e-cog4", "benchmarks/bench_e2e.py",
         (*E2E, "--model", "cog", "--layers", "4", "--iters", "10",
          "--variants", "compile-cudnn,paro-0.2,paro-0.2+comp,paro-0.3", "--max-minutes", "3.5"), 240,
         "4 CogVideoX-5B layers: cuDNN compile, paro at 0.2 / 0.3 and 0.2 with compensation"),
    Spec("e2e-cog4-block16", "benchmarks/bench_e2e.py",
         (*E2E, "--model", "cog", "--layers", "4", "--iters", "10", "--block", "16", "--coherent",
          "--variants", "compile-cudnn,paro-1.0,paro-0.1765,paro-0.1765+comp", "--max-minutes", "3.8"), 250,
         "speed of the fine-block quality recipe: 4 CogVideoX-5B layers with 16-token coherent synthetic plans"),
    Spec("e2e-cog8-fp8", "benchmarks/bench_e2e.py",
         (*E2E, "--model", "cog", "--layers", "8", "--iters", "5",
          "--variants", "compile-cudnn,paro-0.2,compile-cudnn+fp8,paro-0.2+fp8", "--max-minutes", "5.2"), 340,
         "8 CogVideoX-5B layers (B=2), FP8 linears (torchao row-wise): cuDNN compile and paro at 0.2 without and with "
         "them (the per-layer ratios of the 42-layer model)"),
    Spec("e2e-flux", "benchmarks/bench_e2e.py",
         (*E2E, "--model", "flux", "--flux-layers", "5,10", "--iters", "10",
          "--variants", "compile-cudnn,compile,paro-0.5,paro-0.2", "--max-minutes", "4.1"), 270,
         "Flux-1024-shaped transformer (5 double + 10 single blocks): compile default / cuDNN against paro 0.5 / 0.2"),
    # 720p video (a block takes ~0.2-0.6 s per forward: reduced depth, the compiles take most of the budget)
    Spec("e2e-wan720", "benchmarks/bench_e2e.py",
         (*E2E, "--model", "wan", "--layers", "2", "--batch", "1,2", "--iters", "5",
          "--variants", "compile,compile-cudnn,paro-0.2,paro-0.3,compile-flash,paro-0.5", "--max-minutes", "8.6"), 570,
         "Wan2.1-14B-shaped transformer at 720p (75,600 tokens), 2 of 40 blocks, B=1 and the CFG batch B=2: compile with "
         "the default / cuDNN / flash SDPA against paro at 0.2 / 0.3 / 0.5"),
    Spec("e2e-wan720-fa4", "benchmarks/bench_e2e.py",
         (*E2E, "--model", "wan", "--layers", "2", "--batch", "1", "--iters", "5",
          "--variants", "compile-cudnn,paro-0.2,compile-fa4", "--max-minutes", "6"), 400,
         "Wan2.1-14B-shaped 720p, 2 blocks, B1: paro at 0.2 against compile with cuDNN and with FlashAttention-4 "
         "(needs the flash-attn-4 wheels carried)"),
    Spec("e2e-wan720-fp8", "benchmarks/bench_e2e.py",
         (*E2E, "--model", "wan", "--layers", "2", "--batch", "1", "--iters", "5",
          "--variants", "compile-cudnn,paro-0.2,compile-cudnn+fp8,paro-0.2+fp8,paro-0.2+fp8cd,paro-0.3+fp8,paro-0.5+fp8",
          "--max-minutes", "8.6"), 570,
         "Wan2.1-14B-shaped, 720p, 2 blocks, B=1, FP8 linears (torchao row-wise): cuDNN compile and paro 0.2 without and "
         "with them, paro 0.2 with torchao's Inductor settings (where the first call's time goes), paro 0.3 / 0.5"),
    Spec("e2e-hunyuan720", "benchmarks/bench_e2e.py",
         (*E2E, "--model", "hunyuan", "--layers", "1,2", "--batch", "1,2", "--iters", "3",
          "--variants", "compile,paro-0.2,compile-cudnn,compile-efficient,paro-0.3,paro-0.5", "--max-minutes", "8.6"), 570,
         "HunyuanVideo-shaped transformer at 720p (118,800 video + 256 text tokens, key-padding mask), 1 dual + 2 single of "
         "20 + 40 blocks, B=1 and 2: compile default / cuDNN / efficient SDPA against paro at 0.2 / 0.3 / 0.5"),
    Spec("e2e-hunyuan720-fp8", "benchmarks/bench_e2e.py",
         (*E2E, "--model", "hunyuan", "--layers", "1,2", "--batch", "1", "--iters", "3",
          "--variants", "compile,paro-0.2,compile+fp8,paro-0.2+fp8,paro-0.2+fp8cd,paro-0.3+fp8", "--max-minutes", "8.6"),
         570, "HunyuanVideo-shaped, 720p, 1 dual + 2 single blocks, B=1, FP8 linears: compile and paro 0.2 without and "
              "with them, paro 0.2 with torchao's Inductor settings, paro 0.3"),
    # several GPUs (nvidia-h200-x2)
    Spec("cp-wan720", "benchmarks/bench_cp.py", ("--world", "2", "--out", "{out}"), 420,
         "Ulysses over 2 GPUs (NCCL) vs 1: paro attention of one Wan-720p layer (H40·N75600·D128, bf16, density 0.2, "
         "mixed orders), all-to-all time, head imbalance in model and balanced order, a model of 4 and 8 GPUs",
         env={"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}),
    Spec("cp-wan720-model", "benchmarks/bench_cp_model.py", ("--world", "2", "--out", "{out}"), 540,
         "the Wan2.1-14B-shaped transformer at 720p (2 blocks, B=1) under diffusers' Ulysses on 2 GPUs (NCCL) against "
         "one GPU: compile + cuDNN, paro at 0.2, and paro with Inductor's compute/communication reordering",
         env={"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}),
    Spec("ring-fragmentation", "benchmarks/ring_fragmentation.py", ("--out", "{out}"), 120,
         "ring shards one PARO block's tokens lie in, per order, at the Wan-720p grid and ring degrees 2 / 4 / 8 (why "
         "ring sites fall back)", gpu=False),
    Spec("head-imbalance", "benchmarks/head_imbalance.py", ("--out", "{out}"), 480,
         "Ulysses head imbalance of calibrated toy CogVideoX plans (uniform / site / global allocation), model order "
         "and balanced, 2 and 4 ranks", gpu=False),
    # folding
    Spec("fold-depth6", "benchmarks/bench_fold.py",
         ("--depth", "6", "--iters", "10", "--json", "{out}/fold_depth6.json", "--profile", "{out}/profile"), 300,
         "permutation overhead of mixed per-head orders, 6 CogVideoX-5B-shaped blocks, with a kernel profile"),
    Spec("fold-depth2", "benchmarks/bench_fold.py", ("--depth", "2", "--iters", "10", "--json", "{out}/fold_depth2.json"),
         150, "permutation overhead of mixed per-head orders, 2 CogVideoX-5B-shaped blocks"),
    # quality on the trained toy CogVideoX
    Spec("quality", "benchmarks/quality.py", (*QUALITY_EAGER[1:], "--max-minutes", "4"), 300,
         "every quality variant on one seed: PARO / natural order at 0.5 / 0.3 / 0.2, dense, dynamic mask, numerics"),
    Spec("quality-seeds", "benchmarks/quality.py",
         (*QUALITY_EAGER[1:], "--max-minutes", "2.8", "--block", "64", "--calib-prompts", "6",
          "--densities", "0.5,0.3,0.2", "--variants", "paro,natural", "--compensate", "both",
          "--seeds", "1234,4321,999"), 560,
         "PARO vs natural order at 64-token blocks, with and without compensation, pooled over three seeds"),
    Spec("quality-recipe", "benchmarks/quality.py",
         (*QUALITY_EAGER[1:], "--max-minutes", "3", "--block", "16", "--calib-every", "1", "--dense-steps", "3",
          "--densities", "0.1765", "--step-buckets", "3", "--calib-prompts", "6", "--allocation", "global",
          "--compensate", "on", "--variants", "paro,natural", "--seeds", "1234,4321,999"), 570,
         "the best quality recipe at an average density of 0.3 (block 16, 3 dense steps, global allocation, "
         "compensation), PARO and natural order, pooled over three seeds"),
    Spec("quality-fp8", "benchmarks/quality.py",
         (*QUALITY_EAGER[1:], "--max-minutes", "2.5", "--variants", "fp8-linears", "--densities", "0.3",
          "--seeds", "1234,4321,999"), 560,
         "FP8 linears (torchao row-wise) on the toy fixture: the same density-0.3 plan with and without them, and FP8 "
         "linears alone, pooled over three seeds (target: FP8 linears cost <= 1 dB)"),
    Spec("train-toy", "benchmarks/train_video_dit.py", ("--minutes", "2.9", "--out", "{out}"), 300,
         "train the toy CogVideoX fixture (copy OUT/toy_cogvideox to paro_compile/toy/fixtures/)"),
    # tests and CPU-side reports
    Spec("gpu-tests", "pytest", ("-q", "-rf", "-p", "no:logging", "--timeout", "240", "--durations", "15", "-m", "gpu",
                                 "tests", "--ignore", "tests/test_more_diffusers_models.py"), 540,
         "every GPU-marked test but the twelve-model diffusers file, fixed launch configs", env={"PARO_AUTOTUNE": "0"}),
    Spec("gpu-tests-models", "pytest", ("-q", "-rf", "-p", "no:logging", "--timeout", "240", "--durations", "15", "-m",
                                        "gpu", "tests/test_more_diffusers_models.py"), 540,
         "the GPU cases of the twelve extra diffusers transformers (compiled through backend=\"paro\")",
         env={"PARO_AUTOTUNE": "0"}),
    Spec("parallel-gpu-tests", "pytest", ("-q", "-rf", "-p", "no:logging", "--timeout", "300", "-m", "gpu",
                                          "tests/parallel", "tests/passes/test_fold.py", "tests/test_plan_multi_shape.py",
                                          "tests/kernels/test_device_guard.py"),
         360, "GPU-marked tests of context parallelism (2 GPUs, NCCL), dynamic folding, multi-shape plans and "
         "kernels launched on the second GPU",
         env={"PARO_AUTOTUNE": "0", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
              "NVSHMEM_DISABLE_NVLS": "1"}),
    Spec("kernel-tests", "pytest", ("-q", "-rf", "-p", "no:logging", "--timeout", "400", "tests/kernels/test_non_finite.py",
                                    "tests/test_masked_and_cross_attention.py", "tests/kernels/test_attention_hopper.py",
                                    "tests/kernels/test_attention.py", "tests/kernels/test_mask_decode.py",
                                    "tests/kernels/test_launch.py", "-k",
                                    "not diffusers and (cuda or hopper or Hopper or non_finite or bad or key_bias or "
                                    "non_positive or head_dims or bitmap or decode or compact or direct_launches)"), 450,
         "kernel numerics on the GPU: both kernels vs the reference, non-finite inputs, key padding, cross-attention, "
         "bitmap-form masks and their decode",
         env={"PARO_AUTOTUNE": "0"}),
    Spec("calibration-kernel-tests", "pytest", ("-q", "-rf", "-p", "no:logging", "--timeout", "200",
                                                "tests/kernels/test_block_stats.py", "tests/calibration/test_statistics.py"),
         240, "calibration's block-statistics kernels on the GPU against their float64 reference and against the "
              "PyTorch statistics pass (maps, scores, plan)"),
    Spec("host-overhead", "benchmarks/host_overhead.py", ("--out", "{out}"), 110,
         "host cost per paro::attention call and the Flux-1024 call against FlexAttention"),
    Spec("hopper-kernel", "benchmarks/hopper_kernel.py", ("--out", "{out}", "--budget", "450"), 500,
         "both kernels (Gluon and Triton, with and without lazy_rescale) beside cuDNN, SageAttention, FlashAttention-4 "
         "(where it imports) and FlexAttention at 64- and 128-token blocks (CogVideoX and Wan-720p shapes)"),
    Spec("kernel-profile", "benchmarks/kernel_profile.py", ("--out", "{out}", "--max-minutes", "9.2"), 580,
         "Nsight Compute on one call of each kernel (Triton, Gluon, cuDNN dense) at the Wan-720p and CogVideoX "
         "shapes with fewer heads, dense and 0.2: pipe utilisation, issue slots, warp stall reasons per SASS line"),
    Spec("quantization-floor", "benchmarks/quantization_floor.py", ("--out", "{out}"), 240,
         "each quantization step's error alone against float64 (the FP8 PV floor)", gpu=False),
    Spec("plan-memory", "benchmarks/plan_memory.py", ("--out", "{out}"), 240,
         "plan-constant memory per CogVideoX-5B-shaped site, padded int32 CSR vs compact", gpu=False),
    Spec("plan-memory-720p", "benchmarks/plan_memory.py",
         ("--models", "wan720,hunyuan720", "--densities", "0.2,0.3", "--step-buckets", "1,2", "--blocks", "64",
          "--out", "{out}"), 240,
         "GPU-resident plan constants of Wan2.1-14B and HunyuanVideo at 720p against their bf16 weights", gpu=False),
    Spec("kernel-sass", "benchmarks/kernel_sass_report.py", ("--out", "{out}"), 240,
         "registers, spills and the KV-loop SASS mix of the kernel compiled for sm_90a", env={"TRITON_INTERPRET": None},
         gpu=False),
)}
