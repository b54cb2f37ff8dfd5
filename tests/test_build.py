"""The llama.cpp build: no AMX kernels (they segfault on some CPUs, llama.cpp issue 20824), every other
extension of the host kept, and the server saying at start what the build uses."""

import os
import platform
import re
import shutil
import subprocess

import pytest

from engine import cpu_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def makefile_no_amx_flags():
    with open(os.path.join(ROOT, "Makefile")) as f:
        return re.search(r"^NO_AMX := (.+)$", f.read(), re.M)[1].split()


def test_the_loaded_llama_cpp_reports_its_cpu_features_and_no_amx():
    features = cpu_features()
    assert features.startswith("CPU :") and "= 1" in features
    assert not re.search(r"AMX\w* = 1", features), features


@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("gcc"), reason="x86-64 with gcc only")
@pytest.mark.parametrize("order", ["flags after -march", "flags before -march"])
def test_the_build_flags_remove_amx_and_keep_avx512_on_a_cpu_that_has_both(order):
    # -march=sapphirerapids stands for -march=native on an AMX machine: the compiler's view of one
    flags = makefile_no_amx_flags()
    march = ["-march=sapphirerapids"]
    args = march + flags if order == "flags after -march" else flags + march
    compiled = subprocess.run(["gcc", *args, "-dM", "-E", "-"], input="", capture_output=True, text=True)
    if compiled.returncode != 0:
        pytest.skip("this gcc predates AMX (and so cannot emit it)")
    macros = compiled.stdout
    assert "__AMX_" not in macros
    for kept in ("__AVX2__", "__AVX512F__", "__AVX512VNNI__", "__AVX512BF16__"):
        assert kept in macros


def test_the_server_logs_the_build_line_at_start(tmp_path):
    from test_robustness import start_process
    proc = start_process("--port", "0", "--cache-dir", str(tmp_path))
    try:
        for line in proc.stdout:
            if "llama.cpp build:" in line:
                assert "CPU :" in line
                break
            assert "serving" not in line, "served before logging the build"
        else:
            pytest.fail("the server ended without logging the build")
    finally:
        proc.kill()
        proc.wait()
