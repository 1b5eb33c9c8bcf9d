#!/usr/bin/env bash
# Installs gperftools' tcmalloc when the machine can (Debian/Ubuntu, as root), and never fails:
# the pipeline's commands restart themselves with it and their CPU train steps run about 1.15x
# faster (kaggle_pipeline/host_malloc.py, BENCHMARKS.md §1); without it they use glibc's malloc.
set -uo pipefail

if ldconfig -p 2>/dev/null | grep -q 'libtcmalloc\(_minimal\)\?\.so\.4 '; then
  echo "install_tcmalloc: tcmalloc is installed"
  exit 0
fi
if [[ "$(uname -s)" != Linux ]] || ! command -v apt-get >/dev/null || [[ "$(id -u)" != 0 ]]; then
  echo "install_tcmalloc: not a root Debian/Ubuntu shell; commands will use glibc's malloc" \
       "(install libtcmalloc-minimal4 to make CPU steps faster)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04 renamed the package (64-bit time_t); its library has the same name.
for package in libtcmalloc-minimal4 libtcmalloc-minimal4t64; do
  if apt-get install -y -q "$package" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$package" >/dev/null 2>&1; }
  then
    echo "install_tcmalloc: installed $package"
    exit 0
  fi
done
echo "install_tcmalloc: apt-get could not install libtcmalloc-minimal4; commands will use" \
     "glibc's malloc"
exit 0
