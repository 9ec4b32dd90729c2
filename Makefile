# Makefile — builds the three binaries (train, generate, validate), the dataset
# tool and the test runners with nvcc. Works on machines without a GPU.
#
#   make              build everything
#   make test         CPU doctest suite + command-line checks (no GPU needed)
#   make test-gpu     GPU-vs-reference checks (needs a GPU)
#   make data         write the generated default dataset to data/default
#   make GPU_ARCH=sm_80   build for Ampere (sm_86/sm_89 for Ada); default Hopper
NVCC ?= nvcc
GPU_ARCH ?= sm_90a
NVCC_FLAGS ?= -O3
FLAGS = -std=c++17 $(NVCC_FLAGS) -arch=$(GPU_ARCH) -Xcompiler -fopenmp,-Wall -I.
LIBS = -lgomp

HEADERS = common.h cli.h config.h json.h fileutil.h safetensors.h tokenizer.h dataloader.h reference.h model.h
BINARIES = train generate validate data/prepare
TEST_SOURCES = $(wildcard test/test_*.cpp)

.PHONY: all test test-gpu data clean

all: $(BINARIES)

model.o: model.cu $(HEADERS)
	$(NVCC) $(FLAGS) -c $< -o $@

train generate validate: %: %.cu model.o $(HEADERS)
	$(NVCC) $(FLAGS) $< model.o -o $@ $(LIBS)

data/prepare: data/prepare.cu $(HEADERS)
	$(NVCC) $(FLAGS) $< -o $@ $(LIBS)

test/%.o: test/%.cpp $(HEADERS)
	$(NVCC) $(FLAGS) -x cu -c $< -o $@

test/test_cpu: $(TEST_SOURCES:.cpp=.o) model.o
	$(NVCC) $(FLAGS) $^ -o $@ $(LIBS)

test: test/test_cpu all
	./test/test_cpu
	bash test/test_cli.sh

test-gpu:
	@echo "make test-gpu: no GPU tests exist yet (the CUDA path is issue 3)" >&2
	@exit 1

data: data/prepare
	./data/prepare --default --out data/default

clean:
	rm -f $(BINARIES) model.o test/*.o test/test_cpu
