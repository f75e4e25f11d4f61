// The stream every kernel runs on: MLX's CPU stream for the caller's StreamOrDevice, or one error line
// (the kernels are CPU code; the adapter never routes other devices here). Shared by every primitive's file.
#pragma once

#include <stdexcept>

#include "mlx/ops.h"

namespace twinlm {

namespace mx = mlx::core;

inline mx::Stream cpu_stream(mx::StreamOrDevice s) {
  mx::Stream stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("twinlm kernels run on the CPU only");
  return stream;
}

}  // namespace twinlm
