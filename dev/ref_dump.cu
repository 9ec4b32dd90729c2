// ref_dump.cu — a dev tool for the PyTorch comparisons: runs the CPU reference on
// a batch and writes what it computed, so dev/hf_compare.py can set it beside
// transformers' numbers.
//
//   dev/ref_dump MODEL_DIR BATCH.safetensors OUT.safetensors
//
// BATCH holds "input_ids" and "targets" [B, T] as F32 (targets < 0 are ignored).
// OUT holds "logits" [B, T, V], "loss" [1] (mean cross-entropy) and, for every
// trainable tensor, "grad.<HF name>".
#include <cstdio>

#include "model.h"
#include "safetensors.h"

int main(int argc, char** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL_DIR BATCH.safetensors OUT.safetensors\n", argv[0]);
        return 1;
    }
    try {
        Model m;
        model_load(m, argv[1], nullptr);
        SafeTensorsFile batch = safetensors_read(argv[2]);
        const SafeTensor* ids = batch.find("input_ids");
        const SafeTensor* tg = batch.find("targets");
        if (!ids || !tg || ids->shape.size() != 2 || ids->shape != tg->shape) fail("%s: needs input_ids and targets [B, T]", argv[2]);
        const int B = (int)ids->shape[0], T = (int)ids->shape[1], V = m.ref.cfg.vocab_size;
        std::vector<int> inputs(ids->data.begin(), ids->data.end()), targets(tg->data.begin(), tg->data.end());
        float loss = ref_forward(m.ref, inputs.data(), targets.data(), B, T, StepOptions{});
        std::fill(m.ref.grads.begin(), m.ref.grads.end(), 0.0f);
        ref_backward(m.ref);
        std::vector<SafeTensor> out;
        out.push_back({"logits", "F32", {B, T, V}, m.ref.logits});
        out.push_back({"loss", "F32", {1}, {loss}});
        for (const TensorSpec& s : m.ref.layout.tensors) {
            if (s.kind == TENSOR_BUFFER) continue;
            out.push_back({"grad." + s.name, "F32", s.shape,
                           std::vector<float>(m.ref.grads.begin() + s.offset, m.ref.grads.begin() + s.offset + s.numel)});
        }
        safetensors_write(argv[3], out);
        printf("loss %.9g\n", loss);
    } catch (const std::exception& e) {
        fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
