// Op schemas and what the build was made with. The devices register their implementations
// (cpu/kernels_cpu.cpp, cuda/register_cuda.cpp).
#include <torch/library.h>
#include <torch/version.h>

#include <sstream>

#ifdef MANIFOLD_EXT_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION
#endif

namespace manifold_ext {

static std::string build_info_json() {
  std::ostringstream os;
  os << "{\"torch\": \"" << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "."
     << TORCH_VERSION_PATCH << "\"";
#ifdef MANIFOLD_EXT_WITH_CUDA
  os << ", \"cuda\": true, \"cuda_version\": \"" << CUDA_VERSION / 1000 << "."
     << (CUDA_VERSION % 1000) / 10 << "\", \"cuda_archs\": \"" << MANIFOLD_EXT_CUDA_ARCHS << "\"";
#else
  os << ", \"cuda\": false, \"cuda_version\": null, \"cuda_archs\": null";
#endif
  os << "}";
  return os.str();
}

}  // namespace manifold_ext

TORCH_LIBRARY(manifold_ext, m) {
  m.def("interp_linear(Tensor x, Tensor weight, Tensor? bias, Tensor coeffs) -> Tensor");
  m.def(
      "interp_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor coeffs, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "interp_linear_cross_entropy(Tensor x, Tensor weight, Tensor? bias, Tensor coeffs, "
      "Tensor target) -> (Tensor, Tensor, Tensor)");
  m.def(
      "interp_linear_cross_entropy_backward(Tensor grad_loss, Tensor x, Tensor weight, "
      "Tensor? bias, Tensor coeffs, Tensor target, Tensor lse, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("batched_cross_entropy(Tensor logits, Tensor target) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batched_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor lse) -> Tensor");
  m.def("_build_info() -> str", &manifold_ext::build_info_json);
}
