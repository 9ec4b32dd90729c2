// dist.h — the host side of multi-GPU training (data parallel with ZeRO-1), free of CUDA so that the CPU tests
// check it: which process this is (DistGroup), how the flat gradient is cut into buckets that the backward
// hands to NCCL as they become final and how each bucket is split among the ranks (ZeroPlan), expert
// parallelism's groups, the experts each rank holds (ep_shard, layout_pieces) and the all-to-all exchange of an
// MoE layer's rows (EpGroup, EpExchange), the rank-0 hand-off of the NCCL id through a shared directory, and the
// --gpus launcher that forks one process per GPU.
// The NCCL calls are in dist.cu (joining the group, the watchdog, small host collectives) and model.cu (the
// training step's reduce-scatters and all-gathers).
//
// ZeRO-1 here: every rank holds the whole bf16 weights and the whole fp32 gradient; each bucket [begin, begin +
// len) of the flat vector is reduce-scattered, so rank r ends up with the averaged gradient of the r-th
// len/world slice of every bucket, and keeps AdamW's moments for those slices only. It updates its slices of
// the fp32 master weights and the bf16 weights, and an all-gather per bucket gives every rank the new bf16
// weights. A rank's optimizer state is the concatenation of its slices, bucket by bucket. The fp32 master
// weights stay whole-length on every rank (the forward reads the expert biases there, which every rank
// updates alike from the global loads); their other slices go stale until a checkpoint gathers them.
//
// Under expert parallelism a rank lays out only the routed experts it holds (param_layout with ep_shard), so
// its weights, gradients and master weights hold 1/P of the experts; the experts' buckets are split among the
// world / P ranks holding the same experts instead of the whole world (ZeroPlan::ep). Their sum is still divided
// by the world: a holder's gradient already sums the P ranks of its group, whose rows the all-to-all brought it
// (test_dist.cpp checks the result against data parallelism's average). The training step does not use this
// yet: it needs the expert-parallel MoE layer and a second communicator, and a machine with several GPUs to
// check them on.
#pragma once

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "fileutil.h"
#include "reference.h"

struct ncclComm;  // nccl.h's ncclComm_t is a ncclComm*

// The process group. world 1 is a plain single-GPU (or CPU) run: no NCCL, nothing else allocated.
struct DistGroup {
    int rank = 0, world = 1;
    std::string init_dir;     // shared directory through which rank 0 hands out the NCCL id (no MPI)
    bool mpi = false;         // rank, world and the id come from MPI (a USE_MPI build under mpirun)
    bool local = false;       // --gpus: every rank runs on this host
    double timeout = 600;     // seconds a rank waits on the others before it gives up (--nccl-timeout)
    ncclComm* comm = nullptr; // set by dist_init
};

// ----------------------------------------------------------------------------
// Buckets and shards

// Every rank's slice of a bucket is a multiple of 8 elements: 16 bytes of bf16 (the all-gather of the weights)
// and 32 of fp32 (the reduce-scatter of the gradients), NCCL's preferred alignment.
constexpr size_t ZERO_ALIGN = 8;
// A bucket's target size in elements: 16 MiB of fp32 gradient, large enough that NCCL runs near its bandwidth,
// small enough that a layer's gradient leaves while the layers below it are still computing theirs.
constexpr size_t ZERO_BUCKET = (size_t)1 << 22;

struct GradBucket {
    size_t begin, len;  // elements of the flat vector; len is a multiple of world * ZERO_ALIGN
    int ready;          // the backward point (grad_ready_point) after which all its gradients are final
    size_t state;       // where each rank's slice starts in that rank's optimizer state
    bool experts = false;  // routed experts' gradients under expert parallelism: shared by the world / ep ranks
                           // that hold the same experts (bucket_ranks), not by the whole world
};

struct ZeroPlan {
    int world = 1, ep = 1;  // ep: the expert-parallel group's size (1: none)
    size_t padded = 0;  // the flat vector's length rounded up to a multiple of world * ZERO_ALIGN: the GPU
                        // allocates the weights and gradients this long so that every bucket splits evenly
    size_t shard = 0;   // elements of optimizer state per rank: the sum of its slices
    std::vector<GradBucket> buckets;  // in the order the backward finishes them; they tile [0, padded)
};

// how many ranks split a bucket's gradient, and which of them a rank is: the world, or under expert parallelism
// for the experts' buckets the ranks at the same place in their groups (rank i, ep + i, 2 ep + i, ...)
inline int bucket_ranks(const ZeroPlan& p, const GradBucket& b) { return b.experts ? p.world / p.ep : p.world; }
inline int bucket_rank(const ZeroPlan& p, const GradBucket& b, int rank) { return b.experts ? rank / p.ep : rank; }

// The point in the GPU backward (model.cu gpu_backward) after which a tensor's gradient is final: 0 after the
// head and the final norm, 1 + (layers - 1 - l) after layer l, layers + 1 after the embedding.
inline int grad_ready_point(const std::string& name, int layers) {
    if (name == "model.embed_tokens.weight") return layers + 1;
    int l = -1;
    if (sscanf(name.c_str(), "model.layers.%d.", &l) == 1 && l >= 0 && l < layers) return 1 + (layers - 1 - l);
    return 0;
}

inline size_t round_up(size_t x, size_t unit) { return (x + unit - 1) / unit * unit; }

// Cuts [0, padded) into buckets of at most `target` elements (rounded to the alignment unit), never mixing two
// backward points in a bucket but for the few elements that rounding a boundary up to the unit moves across
// (such a bucket waits for the later point). Buckets come out in backward order, top of the layout first.
// ep > 1: L is a rank's layout under expert parallelism (param_layout with ep_shard), whose routed experts
// are cut into buckets of their own exactly (ep_shard aligns them to the unit), since those are shared by
// fewer ranks.
inline ZeroPlan zero_plan(const ParamLayout& L, int layers, int world, size_t target = ZERO_BUCKET, int ep = 1) {
    if (world < 1 || ep < 1 || world % ep) fail("internal: zero_plan for %d ranks in expert-parallel groups of %d", world, ep);
    ZeroPlan p;
    p.world = world;
    p.ep = ep;
    const size_t unit = ZERO_ALIGN * world;
    p.padded = round_up(std::max<size_t>(L.total, 1), unit);
    target = round_up(std::max<size_t>(target, 1), unit);
    std::vector<const TensorSpec*> order;
    for (const TensorSpec& t : L.tensors) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](const TensorSpec* a, const TensorSpec* b) { return a->offset < b->offset; });
    // cuts where the ready point changes, rounded up to the unit, and where the experts start and end
    std::vector<size_t> cuts = {0, p.padded};
    for (size_t i = 1; i < order.size(); i++) {
        const TensorSpec &t = *order[i], &before = *order[i - 1];
        if (grad_ready_point(t.name, layers) != grad_ready_point(before.name, layers)) cuts.push_back(round_up(t.offset, unit));
        if (ep > 1 && is_routed_expert(t.name) != is_routed_expert(before.name)) {
            const size_t at = is_routed_expert(t.name) ? t.offset : round_up(before.offset + before.numel, unit);
            if (at % unit || at > t.offset)
                fail("internal: zero_plan: the experts before %s are not aligned to %zu", t.name.c_str(), unit);
            cuts.push_back(at);
        }
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    for (size_t k = cuts.size() - 1; k > 0; k--)
        for (size_t end = cuts[k]; end > cuts[k - 1];) {
            const size_t begin = end - cuts[k - 1] > target ? end - target : cuts[k - 1];
            p.buckets.push_back({begin, end - begin, 0, 0});
            end = begin;
        }
    for (GradBucket& b : p.buckets)
        for (const TensorSpec* t : order)
            if (t->offset < b.begin + b.len && t->offset + t->numel > b.begin) {
                b.ready = std::max(b.ready, grad_ready_point(t->name, layers));
                b.experts = ep > 1 && is_routed_expert(t->name);
            }
    std::stable_sort(p.buckets.begin(), p.buckets.end(), [](const GradBucket& a, const GradBucket& b) { return a.ready < b.ready; });
    for (GradBucket& b : p.buckets) {
        b.state = p.shard;
        p.shard += b.len / bucket_ranks(p, b);
    }
    return p;
}

// The optimizer's work list for one rank: every chunk (kernels.cuh's ParamChunk: begin, len, decay, state) cut to
// the rank's slices, its state set to where its first element lives in the rank's optimizer state.
template <typename Chunk>
std::vector<Chunk> zero_rank_chunks(const std::vector<Chunk>& all, const ZeroPlan& p, int rank) {
    std::vector<Chunk> out;
    for (const GradBucket& b : p.buckets) {
        const size_t slice = b.len / bucket_ranks(p, b), lo = b.begin + bucket_rank(p, b, rank) * slice, hi = lo + slice;
        for (const Chunk& c : all) {
            const size_t s = std::max<size_t>(lo, c.begin), e = std::min<size_t>(hi, c.begin + c.len);
            if (s >= e) continue;
            Chunk piece = c;
            piece.begin = s;
            piece.len = (int)(e - s);
            piece.state = b.state + (s - lo);
            out.push_back(piece);
        }
    }
    return out;
}

// ----------------------------------------------------------------------------
// Expert parallelism (issue 11: --expert-parallel P), its host side: world = DP x P. The ranks g P .. g P + P - 1
// form an expert-parallel group; rank g P + i holds the routed experts [i E/P, (i + 1) E/P) of every MoE layer,
// and the ranks that hold the same experts (i, P + i, 2P + i, ...) average those experts' gradients among
// themselves. In each MoE layer every rank sorts its slots by expert, as moe_permute does, so the rows bound for
// each peer are one contiguous range; an all-to-all sends them, each receiver regroups what arrived by expert
// (a grouped GEMM wants each expert's rows together), runs its experts, and the same exchange reversed returns
// each output to the slot it came from. The backward sends the output gradients the same way. Every size comes
// from the group's per-expert row counts, exchanged first.

struct EpGroup {
    int size = 1;                    // P
    int index = 0;                   // this rank's place in its group
    int first_expert = 0, experts = 0;  // the routed experts it holds
};

inline EpGroup ep_group(int world, int rank, int P, int E) {
    if (P < 1 || world % P) fail("--expert-parallel %d: the number of processes (%d) must be a multiple of it", P, world);
    if (E % P) fail("--expert-parallel %d: the %d routed experts must split evenly among its ranks", P, E);
    EpGroup g;
    g.size = P;
    g.index = rank % P;
    g.experts = E / P;
    g.first_expert = g.index * g.experts;
    return g;
}

// The experts a rank of the group holds, for param_layout: aligned so that zero_plan can give them buckets of
// their own for a world of that many ranks
inline ExpertShard ep_shard(const EpGroup& g, int world) {
    return {g.first_expert, g.experts, std::lcm(PARAM_ALIGN, ZERO_ALIGN * (size_t)world)};
}

// A rank's tensors in the whole model's layout, matched by name: what a checkpoint gathers from each rank
// (its experts; the shared tensors from any) and what loading scatters back
struct LayoutPiece {
    size_t local, whole, numel;  // offsets in the rank's layout and in the whole model's
};

inline std::vector<LayoutPiece> layout_pieces(const ParamLayout& local, const ParamLayout& whole) {
    std::vector<LayoutPiece> pieces;
    for (const TensorSpec& t : local.tensors) pieces.push_back({t.offset, whole.offset_of(t.name), t.numel});
    return pieces;
}

// One MoE layer's exchange, for one rank of a group
struct EpExchange {
    std::vector<size_t> send_offset, send_count;  // [P] this rank's expert-sorted rows bound for each peer
    std::vector<size_t> recv_offset, recv_count;  // [P] the rows arriving from each peer, peer after peer
    std::vector<size_t> expert_offsets;           // [experts + 1] the arrived rows regrouped by expert
    std::vector<size_t> regrouped;                // [arrived] where each arrived row goes in that grouping: its
                                                  // expert's rows from peer 0, then from peer 1, ..., each peer's in
                                                  // the order it sent them
};

// counts [P][E]: the rows that each rank of the group routes to each expert (the same table on every rank)
inline EpExchange ep_exchange(const EpGroup& g, const std::vector<int>& counts, int E) {
    const int P = g.size, me = g.index, first = g.first_expert, Ep = g.experts;
    if (counts.size() != (size_t)P * E) fail("internal: ep_exchange with %zu counts for %d ranks x %d experts", counts.size(), P, E);
    auto count = [&](int rank, int e) { return (size_t)counts[(size_t)rank * E + e]; };
    EpExchange x;
    x.send_offset.assign(P, 0);
    x.send_count.assign(P, 0);
    x.recv_offset.assign(P, 0);
    x.recv_count.assign(P, 0);
    x.expert_offsets.assign(Ep + 1, 0);
    for (int p = 0; p < P; p++) {
        for (int j = 0; j < Ep; j++) {
            x.send_count[p] += count(me, p * Ep + j);
            x.recv_count[p] += count(p, first + j);
            x.expert_offsets[j + 1] += count(p, first + j);
        }
        if (p > 0) {
            x.send_offset[p] = x.send_offset[p - 1] + x.send_count[p - 1];
            x.recv_offset[p] = x.recv_offset[p - 1] + x.recv_count[p - 1];
        }
    }
    for (int j = 0; j < Ep; j++) x.expert_offsets[j + 1] += x.expert_offsets[j];
    std::vector<size_t> next(x.expert_offsets.begin(), x.expert_offsets.end() - 1);  // per expert: its next free row
    for (int p = 0; p < P; p++)
        for (int j = 0; j < Ep; j++)
            for (size_t i = 0; i < count(p, first + j); i++) x.regrouped.push_back(next[j]++);
    return x;
}

// ----------------------------------------------------------------------------
// The NCCL id, handed out by rank 0 through a directory every rank can read (a shared file system across nodes)

inline std::string dist_id_path(const std::string& dir) { return dir + "/nccl_id"; }

// Rank 0: writes the id (temp file, then rename, so no rank reads half of it). An id left by an earlier run
// would send the other ranks to a group that no longer exists, so rank 0 refuses to start beside one.
inline void dist_publish_id(const std::string& dir, const void* id, size_t n) {
    const std::string path = dist_id_path(dir);
    if (!path_exists(dir)) fail("--init-dir %s: no such directory (it must be shared by every rank)", dir.c_str());
    if (path_exists(path))
        fail("--init-dir %s: %s is left from an earlier run; delete it (or use a fresh directory) and start every rank again",
             dir.c_str(), path.c_str());
    write_file_atomic(path, std::string((const char*)id, n));
}

// The other ranks: wait up to timeout seconds for rank 0's id.
inline void dist_fetch_id(const std::string& dir, void* id, size_t n, double timeout) {
    const std::string path = dist_id_path(dir);
    const double t0 = now_seconds();
    while (!path_exists(path)) {
        if (now_seconds() - t0 > timeout)
            fail("--init-dir %s: rank 0 wrote no NCCL id in %.0f s (is it running, with the same --init-dir?)", dir.c_str(), timeout);
        usleep(20000);
    }
    const std::string bytes = read_file(path);
    if (bytes.size() != n) fail("%s: %zu bytes, not an NCCL id of %zu bytes", path.c_str(), bytes.size(), n);
    memcpy(id, bytes.data(), n);
}

// Rank 0, once every rank has joined (they have all read the id): a clean run leaves no id behind.
inline void dist_retract_id(const std::string& dir) { remove(dist_id_path(dir).c_str()); }

// ----------------------------------------------------------------------------
// Options every rank must share: a hash of the command line without the words that differ by rank

// FNV-1a, continuing from h
inline uint64_t dist_hash(const std::string& s, uint64_t h = 1469598103934665603ull) {
    for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
    return h;
}

inline uint64_t dist_options_hash(int argc, char** argv) {
    uint64_t h = dist_hash("");
    for (int i = 1; i < argc; i++) {
        const std::string w = argv[i];
        if (w == "--process-rank") {
            i++;
            continue;
        }
        if (w.compare(0, 15, "--process-rank=") == 0) continue;
        h = dist_hash(w + '\0', h);
    }
    return h;
}

// ----------------------------------------------------------------------------
// --gpus N: one process per GPU on this host, forked before any CUDA call (a CUDA context does not survive fork)

inline pid_t g_dist_children[1024];
inline int g_dist_num_children = 0;

inline void dist_forward_signal(int sig) {
    for (int i = 0; i < g_dist_num_children; i++)
        if (g_dist_children[i] > 0) kill(g_dist_children[i], sig);
}

// Forks n ranks that share a fresh init directory. In a child, returns -1 with g set (rank r of n); the parent
// waits and returns the exit status: 0 when every rank finished, 130 when they stopped on a signal, else the
// status of the first rank that failed (1 and a one-line error naming it when it was killed), whose siblings
// it has killed at once, so that none waits on a dead rank for the whole timeout. Ctrl-C reaches the ranks
// from the terminal, so the parent ignores SIGINT; SIGTERM it passes on.
inline int dist_launch(int n, DistGroup& g) {
    if (n < 1 || n > 1024) fail("--gpus %d: must be 1..1024", n);
    char tmpl[] = "/tmp/dsv3-init-XXXXXX";
    if (!mkdtemp(tmpl)) fail("--gpus: cannot create a directory for the NCCL id in /tmp (%s)", strerror(errno));
    g.init_dir = tmpl;
    g.world = n;
    g.local = true;
    g_dist_num_children = 0;
    fflush(stdout);
    fflush(stderr);
    for (int r = 0; r < n; r++) {
        pid_t pid = fork();
        if (pid < 0) {
            dist_forward_signal(SIGTERM);
            fail("--gpus: fork failed (%s)", strerror(errno));
        }
        if (pid == 0) {
            g.rank = r;
            return -1;
        }
        g_dist_children[g_dist_num_children++] = pid;
    }
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, dist_forward_signal);
    int status_out = 0, left = n;
    bool failed = false;
    std::string killed;
    while (left > 0) {
        int status = 0;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR) continue;
            break;
        }
        int r = 0;
        while (r < n && g_dist_children[r] != pid) r++;
        if (r == n) continue;
        g_dist_children[r] = 0;
        left--;
        const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        if (code == 0 || failed) continue;
        if (code == 130) {  // stopped by a signal after its checkpoint, as all the ranks do together
            status_out = 130;
            continue;
        }
        // a rank that exits with an error has said why in its own line; one killed outright has not
        failed = true;
        status_out = code > 0 ? code : 1;
        if (code < 0) killed = strfmt("rank %d of %d was killed by signal %d (%s)", r, n, WTERMSIG(status), strsignal(WTERMSIG(status)));
        dist_forward_signal(SIGKILL);
    }
    remove(dist_id_path(g.init_dir).c_str());
    rmdir(g.init_dir.c_str());
    if (!killed.empty()) fprintf(stderr, "error: %s; the other ranks were stopped\n", killed.c_str());
    return status_out;
}

// ----------------------------------------------------------------------------
// The NCCL side (dist.cu)

// Joins the group of g.world processes: binds this process's GPU (rank modulo the GPUs it sees), shares the NCCL
// id (MPI, or dist_publish_id / dist_fetch_id in g.init_dir), creates the communicator and starts the watchdog,
// which ends the process with a one-line error when NCCL reports a failure or when no dist_heartbeat came for
// g.timeout seconds (a rank died or hung). Nothing happens for world 1.
void dist_init(DistGroup& g);
// leaves the group; abort: after an error, without waiting on the other ranks
void dist_free(DistGroup& g, bool abort = false);

// this rank made progress (a step, an evaluation, a save): the watchdog's clock restarts
void dist_heartbeat();

// true on every rank when flag is true on any (the ranks agree to stop at the same step)
bool dist_any(const DistGroup& g, bool flag);

// fails on every rank, with one line, unless every rank passed the same value
void dist_check_same(const DistGroup& g, uint64_t value, const char* what);

#ifdef USE_MPI
// mpirun: rank and world from MPI (MPI_Init is called once; MPI_Finalize at exit)
void dist_from_mpi(DistGroup& g);
#endif
