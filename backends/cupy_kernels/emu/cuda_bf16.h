// Stand-in for CUDA's cuda_bf16.h when the kernels are compiled for the CPU emulator (cuda_emu.h).
#pragma once
#include "cuda_emu.h"
