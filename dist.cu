// dist.cu — the NCCL side of dist.h: joining the process group (rank 0's NCCL id over MPI or through the init
// directory), the watchdog that turns a dead or hung rank into a one-line error within the timeout, and the small
// collectives train.cu needs between steps. The training step's own collectives are in model.cu.
#include "dist.h"

#include <atomic>
#include <thread>

#include "cuda_common.cuh"

#ifdef USE_MPI
#include <mpi.h>
#endif

// The watchdog: a thread per process that never touches CUDA, so it runs while the main thread is stuck in a
// synchronisation that a dead peer will never complete.
static std::atomic<double> g_last_progress{0};
static std::atomic<bool> g_watchdog_stop{false};
static std::atomic<ncclComm*> g_watched_comm{nullptr};
static std::thread g_watchdog;
// dist_any's and dist_check_same's device word and stream
static uint64_t* g_word = nullptr;
static cudaStream_t g_stream = nullptr;

void dist_heartbeat() { g_last_progress = now_seconds(); }

// _exit, not fail: the main thread cannot be unwound from a blocked CUDA call, and a dead CUDA context makes
// destructors hang. No fflush(stdout) either: the main thread might hold its lock (train's stdout is line
// buffered, so its lines are out already)
static void watchdog(int rank, int world, double timeout) {
    while (!g_watchdog_stop) {
        usleep(200000);
        ncclComm* comm = g_watched_comm;
        ncclResult_t async = ncclSuccess;
        if (comm && ncclCommGetAsyncError(comm, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress) {
            fprintf(stderr, "error: rank %d of %d: NCCL failed (%s): another rank died or the network failed\n", rank, world,
                    ncclGetErrorString(async));
            _exit(1);
        }
        const double idle = now_seconds() - g_last_progress;
        if (idle > timeout) {
            fprintf(stderr, "error: rank %d of %d: no progress for %.0f s: another rank died or hung (--nccl-timeout %g)\n", rank,
                    world, idle, timeout);
            _exit(1);
        }
    }
}

void dist_init(DistGroup& g) {
    if (g.world <= 1) return;
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
        fail("no CUDA device (multi-GPU training runs one GPU per rank)");
    if (g.local && g.world > count)
        fail("--gpus %d: this machine has %d GPU%s", g.world, count, count == 1 ? "" : "s");
    // one process per GPU; across nodes, ranks are placed node by node with as many per node as it has GPUs
    CUDA_CHECK(cudaSetDevice(g.rank % count));
    ncclUniqueId id;
    if (g.rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
#ifdef USE_MPI
    if (g.mpi && MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS)
        fail("MPI_Bcast of the NCCL id failed");
#endif
    if (!g.mpi) {
        if (g.init_dir.empty()) fail("--num-processes %d needs --init-dir DIR, a directory every rank can read", g.world);
        if (g.rank == 0) dist_publish_id(g.init_dir, &id, sizeof(id));
        else dist_fetch_id(g.init_dir, &id, sizeof(id), g.timeout);
    }
    dist_heartbeat();
    g_watchdog_stop = false;
    g_watchdog = std::thread(watchdog, g.rank, g.world, g.timeout);
    ncclComm_t comm;
    NCCL_CHECK(ncclCommInitRank(&comm, g.world, id, g.rank));
    g.comm = comm;
    g_watched_comm = comm;
    // every rank has joined, so every rank has read the id
    if (g.rank == 0 && !g.mpi) dist_retract_id(g.init_dir);
    CUDA_CHECK(cudaStreamCreate(&g_stream));
    g_word = device_alloc<uint64_t>(1, "a collective's word");
    dist_heartbeat();
}

void dist_free(DistGroup& g, bool abort) {
    if (g_watchdog.joinable()) {
        g_watchdog_stop = true;
        g_watchdog.join();
    }
    if (!g.comm) return;
    g_watched_comm = nullptr;
    if (abort) ncclCommAbort(g.comm);
    else ncclCommDestroy(g.comm);
    g.comm = nullptr;
    cudaFree(g_word);
    cudaStreamDestroy(g_stream);
}

// all-reduce of one uint64_t on every rank, with op
static uint64_t dist_reduce_word(const DistGroup& g, uint64_t x, ncclRedOp_t op) {
    CUDA_CHECK(cudaMemcpyAsync(g_word, &x, sizeof(x), cudaMemcpyHostToDevice, g_stream));
    NCCL_CHECK(ncclAllReduce(g_word, g_word, 1, ncclUint64, op, g.comm, g_stream));
    CUDA_CHECK(cudaMemcpyAsync(&x, g_word, sizeof(x), cudaMemcpyDeviceToHost, g_stream));
    CUDA_CHECK(cudaStreamSynchronize(g_stream));
    return x;
}

bool dist_any(const DistGroup& g, bool flag) {
    if (g.world <= 1) return flag;
    return dist_reduce_word(g, flag ? 1 : 0, ncclMax) != 0;
}

void dist_check_same(const DistGroup& g, uint64_t value, const char* what) {
    if (g.world <= 1) return;
    // every rank learns whether all agree: the smallest and the largest value are the same
    const uint64_t lo = dist_reduce_word(g, value, ncclMin), hi = dist_reduce_word(g, value, ncclMax);
    if (lo != hi) fail("the ranks were started with different %s", what);
}

#ifdef USE_MPI
void dist_from_mpi(DistGroup& g) {
    int provided = 0;
    if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SINGLE, &provided) != MPI_SUCCESS) fail("MPI_Init failed");
    atexit([] { MPI_Finalize(); });
    MPI_Comm_rank(MPI_COMM_WORLD, &g.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g.world);
    g.mpi = true;
}
#endif
