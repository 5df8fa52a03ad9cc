"""Index-build speed: the C++ helpers against their numpy/Python twins, measured in the same run.

    python benchmarks/data_index.py [--tokens 1e9] [--seq-length 2048] [--blend-samples 1e6]

Synthetic corpus: log-normal document lengths (median ~600 tokens) adding up to --tokens, one
epoch shuffled as GPTDataset does it. Prints seconds per builder and the speed-up over the
reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_lite.data import indices  # noqa: E402


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--blend-samples", type=float, default=1e6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    module = indices.helpers()
    if module is None:
        sys.exit("the C++ helpers could not be built; nothing to compare")
    rng = np.random.RandomState(0)
    draws = rng.lognormal(6.4, 1.0, size=int(args.tokens / 900) + 1)
    lengths = np.maximum(1, draws).astype(np.int32)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths, dtype=np.int64), args.tokens) + 1]
    total = int(lengths.sum(dtype=np.int64))
    documents = np.arange(len(lengths))
    t_doc, doc_idx = timed(lambda: indices.build_doc_idx(documents, 1, np.random.RandomState(1)), 1)
    num_samples = (total - 1) // args.seq_length
    print(f"corpus: {len(lengths):,} documents, {total:,} tokens; {num_samples:,} samples of "
          f"{args.seq_length} tokens; document shuffle {t_doc:.2f} s")

    build_args = (lengths, doc_idx, args.seq_length, num_samples)
    t_np, ref = timed(lambda: indices.build_sample_idx_numpy(*build_args), args.repeats)
    t_cpp, out = timed(lambda: module.build_sample_idx(*build_args), args.repeats)
    assert np.array_equal(ref, out)
    print(f"sample index  numpy {t_np:8.3f} s (reference)   C++ {t_cpp:8.3f} s   "
          f"speed-up {t_np / t_cpp:6.1f}x")

    size = int(args.blend_samples)
    weights = np.array([0.5, 0.3, 0.15, 0.05])
    t_py, ref = timed(lambda: indices.build_blending_indices_python(weights, size), 1)
    t_cpp, out = timed(lambda: module.build_blending_indices(weights, size), args.repeats)
    assert np.array_equal(ref[0], out[0]) and np.array_equal(ref[1], out[1])
    print(f"blend index ({size:,} samples, 4 datasets)  Python {t_py:8.3f} s (reference)   "
          f"C++ {t_cpp:8.3f} s   speed-up {t_py / t_cpp:6.1f}x")


if __name__ == "__main__":
    main()
