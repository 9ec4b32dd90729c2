// timing.cuh — the event timer of the kernel candidates in dev/: the mean time of one call over back-to-back calls
// on the default stream, as a kernel runs inside a training step (launches queued, no gap for the host).
#pragma once

#include "cuda_common.cuh"

// microseconds per call of f over reps calls, after the warm-up (cuda_common.cuh gpu_warm_up)
template <typename F>
float time_us(F f, int reps = 50) {
    cudaEvent_t a, b;
    CUDA_CHECK(cudaEventCreate(&a));
    CUDA_CHECK(cudaEventCreate(&b));
    gpu_warm_up(f);
    CUDA_CHECK(cudaEventRecord(a));
    for (int i = 0; i < reps; i++) f();
    CUDA_CHECK(cudaEventRecord(b));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    CUDA_CHECK(cudaEventDestroy(a));
    CUDA_CHECK(cudaEventDestroy(b));
    return 1e3f * ms / reps;
}
