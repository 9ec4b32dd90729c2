# Makefile — builds the three binaries (train, generate, validate), the dataset
# tool and the test runners with nvcc. Works on machines without a GPU.
#
#   make              build everything
#   make test         CPU doctest suite + command-line checks (no GPU needed)
#   make test-gpu     GPU-vs-reference checks (needs a GPU)
#   make test-gpu-sanitize  test-gpu under compute-sanitizer's memcheck, racecheck, initcheck and synccheck
#   make fuzz         fuzz every parser (clang libFuzzer, ASan, UBSan); FUZZ_SECONDS=N each for a short run
#   make test-asan    the CPU tests under AddressSanitizer and UBSan
#   make data         write the generated default dataset to data/default
#   make GPU_ARCH=80  build for Ampere (86 or 89 for Ada); the default 90a is Hopper
#   make USE_MPI=1    train also starts under mpirun -np N (OpenMPI); without it, --gpus N or
#                     --num-processes/--process-rank/--init-dir start several GPUs (README)
NVCC ?= nvcc
GPU_ARCH ?= 90a
NVCC_FLAGS ?= -O3
FLAGS = -std=c++17 $(NVCC_FLAGS) -gencode=arch=compute_$(GPU_ARCH),code=sm_$(GPU_ARCH) -Xcompiler -fopenmp,-Wall -I.
LIBS = -lcublasLt -lnccl -lgomp
# Hopper's own instructions (wgmma: moe.cuh's grouped expert GEMM) exist only in the sm_90a target
ifeq ($(GPU_ARCH),90a)
    FLAGS += -DHOPPER_WGMMA
endif
# NCCL comes with the CUDA toolkit (lib64/libnccl.so); MPI only launches the ranks and hands out the NCCL id
ifeq ($(USE_MPI),1)
    MPI_HOME ?= /usr/lib/x86_64-linux-gnu/openmpi
    FLAGS += -DUSE_MPI -I$(MPI_HOME)/include
    LIBS += -L$(MPI_HOME)/lib -lmpi
endif

HEADERS = common.h cli.h config.h json.h fileutil.h safetensors.h tokenizer.h dataloader.h corpus.h chart.h fp8.cuh reference.h model.h decode.h dist.h
BINARIES = train generate validate data/prepare
TEST_SOURCES = $(wildcard test/test_*.cpp)

.PHONY: all test test-gpu test-gpu-sanitize test-asan fuzz data clean

all: $(BINARIES)

# the model (model.cu: CPU and GPU paths; checkpoint.cpp; dist.cu: the multi-GPU process group) and the GPU decoder (decode.cu)
MODEL = model.o checkpoint.o dist.o

model.o: model.cu $(HEADERS) gpu_model.cuh cuda_common.cuh kernels.cuh mla.cuh moe.cuh
	$(NVCC) $(FLAGS) -c $< -o $@

checkpoint.o: checkpoint.cpp $(HEADERS)
	$(NVCC) $(FLAGS) -c $< -o $@

dist.o: dist.cu $(HEADERS) cuda_common.cuh
	$(NVCC) $(FLAGS) -c $< -o $@

decode.o: decode.cu decode.cuh $(HEADERS) gpu_model.cuh cuda_common.cuh kernels.cuh mla.cuh moe.cuh
	$(NVCC) $(FLAGS) -c $< -o $@

train: train.cu $(MODEL) $(HEADERS)
	$(NVCC) $(FLAGS) $< $(MODEL) -o $@ $(LIBS)

generate validate: %: %.cu $(MODEL) decode.o $(HEADERS)
	$(NVCC) $(FLAGS) $< $(MODEL) decode.o -o $@ $(LIBS)

data/prepare: data/prepare.cu $(HEADERS)
	$(NVCC) $(FLAGS) $< -o $@ $(LIBS)

# the generation benchmark (bench/generate_bench.sh runs it on the device machine)
bench/decode_bench: bench/decode_bench.cu $(MODEL) decode.o $(HEADERS)
	$(NVCC) $(FLAGS) $< $(MODEL) decode.o -o $@ $(LIBS)

# where FP8 pays, GEMM by GEMM (bench/fp8.sh runs it on the device machine)
bench/fp8_gemm: bench/fp8_gemm.cu $(HEADERS) cuda_common.cuh kernels.cuh moe.cuh
	$(NVCC) $(FLAGS) $< -o $@ $(LIBS)

# dev tools for the PyTorch comparisons (dev/*.py run them on the device machine)
dev/ref_dump: dev/ref_dump.cu $(MODEL) $(HEADERS)
	$(NVCC) $(FLAGS) $< $(MODEL) -o $@ $(LIBS)

# candidates checked against the code they would replace or extend (scratch work; each header says what it tries)
dev/ep_moe dev/swiglu_fp8_bench dev/persistent_gemv_bench: dev/%: dev/%.cu $(HEADERS) cuda_common.cuh kernels.cuh moe.cuh mla.cuh
	$(NVCC) $(FLAGS) $< -o $@ $(LIBS)

test/%.o: test/%.cpp $(HEADERS) test/test_configs.h cuda_common.cuh kernels.cuh
	$(NVCC) $(FLAGS) -x cu -c $< -o $@

test/test_cpu: $(TEST_SOURCES:.cpp=.o) $(MODEL)
	$(NVCC) $(FLAGS) $^ -o $@ $(LIBS)

# passive OpenMP waiting keeps the many short parallel regions fast on a busy machine
test: test/test_cpu all
	OMP_WAIT_POLICY=passive ./test/test_cpu
	for script in test/cli_*.sh; do OMP_WAIT_POLICY=passive bash $$script || exit 1; done

# the CPU tests under AddressSanitizer and UndefinedBehaviorSanitizer, built in one command, apart from the
# normal objects; protect_shadow_gap=0 lets the CUDA runtime map its memory (it looks for a GPU)
ASAN_FLAGS = -std=c++17 -O1 -gencode=arch=compute_$(GPU_ARCH),code=sm_$(GPU_ARCH) -I. \
	-Xcompiler -fopenmp,-fsanitize=address,-fsanitize=undefined,-fno-sanitize-recover=undefined,-fno-omit-frame-pointer

test/test_asan: $(TEST_SOURCES) model.cu checkpoint.cpp dist.cu $(HEADERS) test/test_configs.h gpu_model.cuh cuda_common.cuh kernels.cuh mla.cuh moe.cuh
	$(NVCC) $(ASAN_FLAGS) -x cu $(TEST_SOURCES) model.cu checkpoint.cpp dist.cu -o $@ $(LIBS)

test-asan: test/test_asan
	ASAN_OPTIONS=protect_shadow_gap=0 OMP_WAIT_POLICY=passive ./test/test_asan

GPU_TEST_SOURCES = $(wildcard test/gpu_*.cu)

test/gpu_%.o: test/gpu_%.cu $(HEADERS) test/test_configs.h $(wildcard *.cuh)
	$(NVCC) $(FLAGS) -c $< -o $@

test/test_gpu: test/test_main.o $(GPU_TEST_SOURCES:.cu=.o) $(MODEL) decode.o
	$(NVCC) $(FLAGS) $^ -o $@ $(LIBS)

# the suite "alone" reads the whole device's free memory, so it runs after the others in a process of its own
test-gpu: test/test_gpu
	./test/test_gpu --test-suite-exclude=alone
	./test/test_gpu --test-suite=alone

# each case in its own process, 16 at a time, at most 900 s each (test/sanitize_gpu.sh)
test-gpu-sanitize: test/test_gpu
	bash test/sanitize_gpu.sh

# Fuzzing every parser of untrusted input (test/fuzz/fuzz.cpp) with clang's libFuzzer, ASan and UBSan, from
# seeds the project's writers make: FUZZ_RUNS executions each (default a million), or FUZZ_SECONDS each
FUZZ_PARSERS = json config safetensors tokens tokenizer
FUZZ_RUNS ?= 1000000
FUZZ_LIMIT = $(if $(FUZZ_SECONDS),-max_total_time=$(FUZZ_SECONDS),-runs=$(FUZZ_RUNS))
FUZZ_FLAGS = -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I.

test/fuzz/fuzz_%: test/fuzz/fuzz.cpp $(HEADERS)
	clang++ $(FUZZ_FLAGS) -DFUZZ_$(shell echo $* | tr a-z A-Z) $< -o $@

test/fuzz/make_seeds: test/fuzz/make_seeds.cpp $(HEADERS)
	clang++ -std=c++17 -O1 -I. $< -o $@

fuzz: test/fuzz/make_seeds $(FUZZ_PARSERS:%=test/fuzz/fuzz_%)
	./test/fuzz/make_seeds test/fuzz/corpus
	for p in $(FUZZ_PARSERS); do \
		./test/fuzz/fuzz_$$p $(FUZZ_LIMIT) -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 test/fuzz/corpus/$$p \
			> test/fuzz/$$p.log 2>&1 || { tail -40 test/fuzz/$$p.log; exit 1; }; \
		echo "fuzz $$p: $$(grep -o 'stat::number_of_executed_units: *[0-9]*' test/fuzz/$$p.log | grep -o '[0-9]*$$') executions, no finding"; \
	done

data: data/prepare
	./data/prepare --default --out data/default --vocab 1024

clean:
	rm -f $(BINARIES) dev/ref_dump dev/ep_moe dev/swiglu_fp8_bench dev/persistent_gemv_bench bench/decode_bench bench/fp8_gemm $(MODEL) decode.o test/*.o test/test_cpu test/test_gpu test/test_asan
	rm -rf test/sanitize test/fuzz/corpus test/fuzz/*.log test/fuzz/make_seeds $(FUZZ_PARSERS:%=test/fuzz/fuzz_%)
