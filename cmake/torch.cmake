# Reads what an extension needs from the installed torch instead of torch's own CMake package,
# whose CUDA discovery differs between torch releases (2.11 on the GPU machines, 2.14 here).
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "
import os, torch
from torch.utils import cpp_extension as ce
print('|'.join(ce.include_paths()))
print(os.path.join(os.path.dirname(torch.__file__), 'lib'))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.version.cuda or 'none')
print(torch.__version__)
"
  OUTPUT_VARIABLE _torch_info OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "ossrl needs torch installed in the build's Python (${Python_EXECUTABLE}); "
                      "build with `pip wheel --no-build-isolation .` after `pip install torch`.")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 _torch_includes)
list(GET _torch_info 1 TORCH_LIB_DIR)
list(GET _torch_info 2 TORCH_CXX11_ABI)
list(GET _torch_info 3 TORCH_CUDA_VERSION)
list(GET _torch_info 4 TORCH_VERSION)
string(REPLACE "|" ";" TORCH_INCLUDE_DIRS "${_torch_includes}")
message(STATUS "ossrl: torch ${TORCH_VERSION} (CUDA '${TORCH_CUDA_VERSION}') at ${TORCH_LIB_DIR}")

set(TORCH_DEFINITIONS _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI} TORCH_EXTENSION_NAME=_C)
foreach(_lib c10 torch_cpu torch)
  find_library(_path_${_lib} ${_lib} PATHS ${TORCH_LIB_DIR} NO_DEFAULT_PATH REQUIRED)
  list(APPEND TORCH_LIBRARIES ${_path_${_lib}})
endforeach()
