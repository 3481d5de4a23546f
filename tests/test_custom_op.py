"""Building the compiled warp kernel: cached by content, atomic, clear failures."""

import shutil

import pytest

from pipeline.training import custom_op

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler on this machine")


@needs_compiler
def test_build_compiles_once_into_the_cache_and_then_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_KERNEL_CACHE", str(tmp_path))
    library = custom_op.build()
    assert library.parent == tmp_path and library.suffix == ".so" and library.stat().st_size > 0
    built = library.stat().st_mtime_ns
    assert custom_op.build() == library and library.stat().st_mtime_ns == built
    assert [path.name for path in tmp_path.iterdir()] == [library.name]  # no scratch left behind


def test_a_failing_compiler_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="compiling warp_kernel.cc failed"):
        custom_op.build(compiler=shutil.which("false"))
    assert list(tmp_path.iterdir()) == []


def test_unet_kernel_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("UNET_KERNEL", "0")
    assert custom_op.load.__wrapped__() is None  # the uncached function: load() itself is memoised
