// What the CUDA ctests share: stop at the first failing CUDA runtime call, naming it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>

#define CHECK_CUDA(call)                                                          \
  do {                                                                            \
    cudaError_t err_ = (call);                                                    \
    if (err_ != cudaSuccess) {                                                    \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, \
                  __LINE__);                                                      \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)
