# CUDA kernels: built when torch is a CUDA build and nvcc is available (OSSRL_CUDA=AUTO), or
# required (OSSRL_CUDA=ON). Kernels target sm_90a first; CUTLASS/CuTe headers come from the
# nvidia-cutlass wheel (see third_party/README.md), never from a copy in this repository.
set(_why "")
if(TORCH_CUDA_VERSION STREQUAL "none")
  set(_why "torch ${TORCH_VERSION} is not a CUDA build")
else()
  if(NOT CMAKE_CUDA_COMPILER)
    if(DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
      set(CMAKE_CUDA_COMPILER "$ENV{CUDA_HOME}/bin/nvcc")
    elseif(EXISTS /usr/local/cuda/bin/nvcc)
      set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
    endif()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_why "no nvcc found (set CUDA_HOME)")
  endif()
endif()

if(_why)
  if(OSSRL_CUDA STREQUAL "ON")
    message(FATAL_ERROR "ossrl: OSSRL_CUDA=ON but ${_why}")
  endif()
  message(STATUS "ossrl: CPU kernels only: ${_why}")
  return()
endif()

set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_ARCHITECTURES ${OSSRL_CUDA_ARCHS})
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
set(OSSRL_WITH_CUDA ON)
set(OSSRL_CUTLASS_FOUND OFF)

# torch's CUDA headers include cuBLAS/cuSPARSE headers; pip's CUDA builds of torch ship them
# under site-packages/nvidia/cu*/include, which the toolkit may lack.
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "
import glob, os, torch
sp = os.path.dirname(os.path.dirname(torch.__file__))
print('|'.join(sorted(glob.glob(os.path.join(sp, 'nvidia', '*', 'include')))))
try:
    import cutlass_library
    print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))
except ImportError:
    print('')
"
  OUTPUT_VARIABLE _cuda_info OUTPUT_STRIP_TRAILING_WHITESPACE)
string(REPLACE "\n" ";" _cuda_info "${_cuda_info}")
list(GET _cuda_info 0 _nv_includes)
string(REPLACE "|" ";" _nv_includes "${_nv_includes}")
set(OSSRL_CUDA_INCLUDE_DIRS ${CUDAToolkit_INCLUDE_DIRS} ${_nv_includes})
list(LENGTH _cuda_info _n)
if(_n GREATER 1)
  list(GET _cuda_info 1 OSSRL_CUTLASS_INCLUDE)
endif()
if(DEFINED ENV{CUTLASS_INCLUDE_DIR})
  set(OSSRL_CUTLASS_INCLUDE "$ENV{CUTLASS_INCLUDE_DIR}")
endif()
if(OSSRL_CUTLASS_INCLUDE AND EXISTS "${OSSRL_CUTLASS_INCLUDE}/cute/tensor.hpp")
  list(APPEND OSSRL_CUDA_INCLUDE_DIRS ${OSSRL_CUTLASS_INCLUDE})
  set(OSSRL_CUTLASS_FOUND ON)
  message(STATUS "ossrl: CUTLASS/CuTe headers from ${OSSRL_CUTLASS_INCLUDE}")
endif()

set(TORCH_CUDA_LIBRARIES CUDA::cudart)
foreach(_lib c10_cuda torch_cuda)
  find_library(_path_${_lib} ${_lib} PATHS ${TORCH_LIB_DIR} NO_DEFAULT_PATH REQUIRED)
  list(APPEND TORCH_CUDA_LIBRARIES ${_path_${_lib}})
endforeach()

# torch's own extension flags: c10::Half/BFloat16 provide the conversions, not cuda_fp16.h.
set(OSSRL_CUDA_FLAGS --expt-relaxed-constexpr --expt-extended-lambda -O3 -lineinfo
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
    -Xcompiler=-fPIC)
message(STATUS "ossrl: CUDA kernels for ${OSSRL_CUDA_ARCHS} with nvcc ${CMAKE_CUDA_COMPILER_VERSION}")
