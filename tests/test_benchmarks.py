"""The benchmarks that check themselves, in a small mode, so their checks cannot rot unseen: the
communication volume of one training step against its analytic count, the checkpoint benchmark's
read-back, the step-overhead and DDP benchmarks' same-model checks. Timings are printed, never asserted."""

import subprocess
import sys

from test_training import REPO

sys.path.insert(0, str(REPO))
from benchmarks import comm_volume  # noqa: E402


def test_comm_volume_matches_the_analytic_count(ranks):
    """gpt_tiny at TP2 × PP2 (VPP 2) × DP2 with sequence parallelism: every rank's bytes per
    (collective, group) equal the benchmark's formula (which has no reduction for the inf/NaN check)."""
    results = ranks(8).run(comm_volume._measure, comm_volume.DEFAULT_OVERRIDES)
    assert comm_volume.differences(results) == []


def test_comm_volume_counts_fp8_to_the_byte(ranks):
    """FP8 delayed scaling at TP2 (SP) × DP2: the QKV and fc1 inputs' all-gathers in FP8 bytes, the
    amax reductions over TP and the histories' over TP and DP, equal the formula."""
    single_stage = ["parallel.pipeline_model_parallel_size=1", "parallel.virtual_pipeline_model_parallel_size=null"]
    fp8 = ["training.fp8_format=hybrid", "training.fp8_recipe=delayed"]
    results = ranks(4).run(comm_volume._measure, comm_volume.DEFAULT_OVERRIDES + single_stage + fp8)
    assert comm_volume.differences(results) == []


def test_comm_volume_counts_fp8_expert_dispatch_to_the_byte(ranks):
    """MoE with FP8 at TP2 (SP) × EP2: the dispatch all-to-all sends each row as h FP8 bytes and an
    fp32 scale (the combine and the backward in fp32), beside the shared expert's FP8 all-gathers."""
    from test_moe import MOE_BASE

    single_stage = ["parallel.pipeline_model_parallel_size=1", "parallel.virtual_pipeline_model_parallel_size=null"]
    moe = [o for o in MOE_BASE if o.split("=")[0].startswith("model")] + ["parallel.expert_model_parallel_size=2"]
    results = ranks(4).run(comm_volume._measure, comm_volume.DEFAULT_OVERRIDES + single_stage + moe
                           + ["training.fp8_format=hybrid"])
    assert all(r["measured"].get("all_to_all/EP", 0) > 0 for r in results)
    assert comm_volume.differences(results) == []


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_checkpoint_io_reads_back_what_it_wrote(tmp_path):
    out = _run("benchmarks/checkpoint_io.py", "--ranks", "2", "--mb", "8", "--dir", str(tmp_path / "bench"))
    assert "load:" in out


def test_step_overhead_compares_the_same_model():
    out = _run("benchmarks/step_overhead.py", "--rounds", "1", "--models", "gpt_tiny", "--threads", "1")
    assert '"benchmark": "step_overhead"' in out


def test_ddp_step_compares_the_same_model():
    """Both megatron_lite variants and the DDP model start from the same loss (the benchmark exits
    non-zero otherwise), at a tiny shape."""
    out = _run("benchmarks/ddp_step.py", "--rounds", "1", "--layers", "1", "--hidden", "64", "--seq", "32",
               "--micro-batch", "1", "--bucket-elements", "20000")
    assert '"benchmark": "ddp_step"' in out and "overlap pays" in out
