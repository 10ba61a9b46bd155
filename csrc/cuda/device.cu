// Device queries for pyoptk._C.cuda_device_count() and build_info().
#include <string>

#include "cuda_util.cuh"

namespace pyoptk {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear the error, report none
    return 0;
  }
  return n;
}

std::string cuda_runtime_info() {
  const int v = CUDART_VERSION;  // the runtime linked in (static)
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace pyoptk
