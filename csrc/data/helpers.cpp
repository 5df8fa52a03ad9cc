// Index builders for the GPT and blended datasets (megatron_lite/data/indices.py has the numpy
// twins, which must return identical arrays). Built on first use by megatron_lite.extensions.
//
// Only pybind11 is needed (bundled with torch); no torch headers, so the build takes seconds.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

using Int32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using Float64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Sample i covers the seq_length + 1 tokens that start at token i * seq_length of the stream
// sizes[doc_idx[0]], sizes[doc_idx[1]], ... (consecutive samples share one token: the last label
// of sample i is the first input of sample i + 1). Row i of the result is (position in doc_idx of
// the document holding token i * seq_length, offset of that token in the document), for
// i = 0..num_samples, so row i + 1 is where sample i ends (inclusive). Empty documents are never
// pointed at.
Int64Array build_sample_idx(const Int32Array& sizes, const Int64Array& doc_idx, int64_t seq_length,
                            int64_t num_samples) {
  if (seq_length <= 0 || num_samples < 0) {
    throw std::invalid_argument("build_sample_idx: seq_length must be positive, num_samples >= 0");
  }
  const int32_t* size = sizes.data();
  const int64_t* doc = doc_idx.data();
  const int64_t num_sizes = sizes.size();
  const int64_t num_docs = doc_idx.size();

  Int64Array result({num_samples + 1, int64_t{2}});
  int64_t* out = result.mutable_data();
  bool overrun = false, bad_id = false;
  {
    py::gil_scoped_release release;
    int64_t d = 0;          // position in doc_idx
    int64_t doc_start = 0;  // stream position of the first token of document doc_idx[d]
    int64_t doc_length = 0;
    for (int64_t i = 0; i <= num_samples && !overrun && !bad_id; ++i) {
      const int64_t position = i * seq_length;
      for (;;) {
        if (d >= num_docs) { overrun = true; break; }
        if (doc[d] < 0 || doc[d] >= num_sizes) { bad_id = true; break; }
        doc_length = size[doc[d]];
        if (doc_start + doc_length > position) break;
        doc_start += doc_length;
        ++d;
      }
      out[2 * i] = d;
      out[2 * i + 1] = position - doc_start;
    }
  }
  if (bad_id) throw std::out_of_range("build_sample_idx: doc_idx holds an id outside sizes");
  if (overrun) {
    throw std::out_of_range(
        "build_sample_idx: the documents hold fewer than num_samples * seq_length + 1 tokens");
  }
  return result;
}

// Megatron's greedy blend: sample s goes to the dataset whose count lags its share the most,
// argmax_k(weights[k] * max(s, 1) - taken[k]), the first such k on ties. Returns (dataset of each
// sample int16, index of the sample within that dataset int64).
py::tuple build_blending_indices(const Float64Array& weights, int64_t size) {
  const int64_t num_datasets = weights.size();
  if (num_datasets <= 0 || num_datasets > INT16_MAX || size < 0) {
    throw std::invalid_argument("build_blending_indices: need 1..32767 datasets and size >= 0");
  }
  py::array_t<int16_t> dataset_index(size);
  Int64Array dataset_sample_index(size);
  const double* weight = weights.data();
  int16_t* which = dataset_index.mutable_data();
  int64_t* within = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> taken(num_datasets, 0);
    for (int64_t s = 0; s < size; ++s) {
      const double target = static_cast<double>(s > 1 ? s : 1);
      int64_t best = 0;
      double best_error = weight[0] * target - static_cast<double>(taken[0]);
      for (int64_t k = 1; k < num_datasets; ++k) {
        const double error = weight[k] * target - static_cast<double>(taken[k]);
        if (error > best_error) {
          best_error = error;
          best = k;
        }
      }
      which[s] = static_cast<int16_t>(best);
      within[s] = taken[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_lite data index builders";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_length"), py::arg("num_samples"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"));
}
