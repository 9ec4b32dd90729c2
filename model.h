// model.h — the model as the binaries use it: creation, one training step with gradient accumulation,
// evaluation, sampling, and checkpoints (a directory with config.json, model.safetensors with HF tensor
// names, tokenizer.bin and the training state) written atomically and read back bit-exactly.
#pragma once

#include <string>
#include <vector>

#include "config.h"
#include "dataloader.h"
#include "dist.h"
#include "reference.h"
#include "tokenizer.h"

struct TrainOptions {
    OptimOptions optim;
    int batch_size = 8;
    int seq_len = 256;
    int grad_accum = 1;          // micro-batches per optimizer step
    float dropout = 0;           // after the embedding, attention output and FFN output
    float attn_dropout = 0;      // on the attention probabilities (nanoGPT's attn_dropout)
    float balance_alpha = 1e-4f; // sequence-wise balance loss weight (0 = off)
    uint64_t seed = 1337;
    bool cuda_graph = true;      // GPU: replay each micro-step as a CUDA graph when it can
    bool fp8 = false;            // DeepSeek-V3's FP8 GEMMs (fp8.cuh; the CPU emulates them)
    bool fp8_wgrad = false;      // with fp8, the weight gradients' GEMMs in FP8 too
    float mtp_lambda = 0.3f;     // loss = main + mtp_lambda * MTP loss, when the config has the module (DeepSeek-V3's value
                                 // for most of its run)
    bool shuffle = false;        // training rows at random offsets (DataLoader::shuffle_key), not in order
};

// What exact resume needs beyond the weights (the optimizer moments live in optimizer.safetensors). Dropout
// masks are keyed by (seed, step), so no RNG stream has to be saved.
struct TrainState {
    int step = 0;                  // optimizer steps done
    uint64_t data_position = 0;    // the training loader's position
    double best_val_loss = INFINITY;
    TrainOptions options;
    std::vector<std::string> run_options;  // ./train's data, logging and saving options, as command-line words
};

struct GpuModel;  // the CUDA path's device state (model.cu)

struct Model {
    RefModel<float> ref;           // the CPU reference; parameters in ref.params
    GpuModel* gpu = nullptr;       // set by model_to_gpu: steps run on the GPU and
                                   // ref.params is stale until model_sync_host
    std::vector<float> adam_m, adam_v;
    Tokenizer tokenizer;           // the byte tokenizer when the checkpoint has none
    std::vector<std::vector<int64_t>> expert_load;  // [c.total_layers()][expert] tokens routed since the last reset
};

struct StepStats {
    float loss;          // mean cross-entropy over the step's micro-batches
    float balance_loss;  // the sequence-wise balance loss term (0 when off)
    double grad_norm;    // before clipping
    float lr;
    float mtp_loss;      // the MTP module's mean cross-entropy (0 without one)
};

// fresh weights (HF's init: normal(0, 0.02), unit norms, zero expert bias)
void model_create(Model& m, const Config& c, uint64_t seed);

// true when a CUDA device is present
bool gpu_available();

// Moves training to the GPU: uploads weights and optimizer moments and allocates activations for batches of
// up to B sequences of T tokens. Fails with a clear message (no device, out of memory with the size needed,
// unsupported shapes). inference: forward only (generation), no gradients, moments or backward buffers.
// dist: a group joined by dist_init with world > 1 trains data parallel with ZeRO-1 (dist.h): every rank
// runs its own micro-batches, the step averages the gradients over the ranks and each rank keeps the
// optimizer state of its slices of the weights only.
void model_to_gpu(Model& m, int B, int T, bool inference = false, const DistGroup& dist = DistGroup());

// copies the GPU's weights, last gradients and optimizer moments back into m. Under ZeRO-1 every rank must
// call it (it gathers the master weights and the moments from all ranks), and the gradients are not copied:
// a rank holds the averaged gradient of its slices only.
void model_sync_host(Model& m);

void model_free_gpu(Model& m);

// device memory the GPU path allocated (weights, optimizer, activations, scratch);
// it allocates everything up front, so this is also its peak
size_t model_gpu_bytes(const Model& m);

// One optimizer step (step counts from 0): grad_accum micro-batches from the loader,
// clipping, AdamW, then the aux-loss-free expert-bias update. Data parallel, each rank
// takes its own micro-batches (the loader's rank and world) and the stats are the
// group's: the mean loss, the global gradient norm, every rank's expert loads. A step whose gradient
// norm is not finite (a NaN or inf loss gives one) leaves the weights and the AdamW
// moments as they were.
StepStats model_train_step(Model& m, DataLoader& loader, const TrainOptions& o, int step);

// The MTP module on evaluation data: its mean cross-entropy (predicting the token after next) and how often
// its drafts would be accepted in self-speculative decoding, sampled (temperature 1) and greedy (reference.h
// mtp_acceptance), over `predictions` positions
struct MtpEval {
    double loss = 0, accepted_sampled = 0, accepted_greedy = 0;
    long long predictions = 0;
};

// Mean next-token loss over tokens: consecutive non-overlapping windows of seq_len
// predictions (inputs tokens[i*L .. i*L+L), targets shifted by one); the last,
// partial window is used as it is, so every token but the first is predicted once.
// mtp (when the model has the module): its MtpEval over the same windows.
double model_eval_loss(Model& m, const std::vector<int>& tokens, int seq_len, int batch_size, MtpEval* mtp = nullptr);

// logits [T, V] at every position of one sequence (a forward pass without targets)
const std::vector<float>& model_logits(Model& m, const std::vector<int>& tokens);

struct SamplingOptions {
    float temperature = 1.0f;  // 0 = greedy
    int top_k = 0;             // 0 = off
    float top_p = 1.0f;        // 1 = off
};

// Picks a token from logits [V]; coin is uniform in [0, 1).
int sample_token(const float* logits, int V, const SamplingOptions& s, float coin);

// the distribution sample_token draws from, as probabilities probs [V] (greedy: one-hot at the argmax)
void sampling_probs(std::vector<double>& probs, const float* logits, int V, const SamplingOptions& s);

// a token drawn from probs [V] (weights, normalised here; a token of weight 0 is never drawn); coin in [0, 1)
int sample_probs(const std::vector<double>& probs, float coin);

// Writes dir atomically. state may be null (weights only). dtype "F32", "BF16" or "F8_E4M3" (DeepSeek-V3's
// FP8 checkpoint format); the last two shrink the file but are not exact resume points.
void model_save(Model& m, const std::string& dir, const TrainState* state, const char* dtype);

// Reads config.json, model.safetensors and tokenizer.bin (bytes when absent). When
// state is not null the training state must be present too.
void model_load(Model& m, const std::string& dir, TrainState* state);

// dir's trainer_state.json, checked
TrainState checkpoint_state(const std::string& dir);

// true when dir holds a training state (a resumable checkpoint)
bool checkpoint_has_state(const std::string& dir);

// A --model argument names a checkpoint directory or a training run directory holding checkpoint/; returns
// the checkpoint directory. is_default adds a hint to train one first.
std::string model_resolve_dir(const std::string& dir, bool is_default);
